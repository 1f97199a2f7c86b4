"""The eval harness: `workbench eval` scores a model from a run folder or a Hugging Face directory.

    registry.py         tasks by name (one file each under tasks/), the EvalContext a task gets, jsonl readers
    runner.py           load once, run the asked tasks, results.json + report.md (+ the run's report.md)
    scoring.py          log-likelihood windows (lm-eval's rolling rule), prompt fitting, batched generation
    report.py, plots.py the eval folder's report and figures
    lm_eval_adapter.py  any workbench decoder as the lm-evaluation-harness model "workbench"
    tasks/              perplexity, exact_match, reasoning, lm_eval

docs/evals.md has the commands, the output format and how to add a task.
"""
