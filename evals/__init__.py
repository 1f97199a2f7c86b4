"""The eval harness: a task registry, one task per file, a runner and reports. Filled in by the eval-harness issue."""
