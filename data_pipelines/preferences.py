"""Teacher-style preference pairs about documented functions, with examples that really run, and their checker.

A record (DPO data; the prompt is one user turn, the answers are assistant turns):

    {"prompt": "How does textwrap.shorten work?",
     "chosen": "`textwrap.shorten(text, width, **kwargs)` collapses and truncates the given text to fit in the "
               "given width.\\nExample:\\n>>> import textwrap\\n>>> textwrap.shorten(\\"Hello  world!\\", width=12)\\n"
               "'Hello world!'\\n>>> textwrap.shorten(\\"Hello  world!\\", width=11)\\n'Hello [...]'",
     "rejected": "Just call `textwrap.shorten`.",
     "kind": "terse",                      # or "wrong": the chosen answer with one shown output made wrong
     "subject": "textwrap.shorten", "source": "textwrap.py:398"}

How a pair is made
    Subjects are the public documented functions and methods of a source tree (default: the standard library;
    files under test/tests/idlelib/tkinter/... and private modules are left out), found with `ast`, plus, for
    the standard library, the public functions and classes of a curated list of safe, pure modules (`CURATED`:
    math, statistics, textwrap, itertools, ...), found by importing them in the sandbox.
    The prompt asks about the subject in one of several phrasings ("How do I use X?", "Explain X with an
    example.", ...). The chosen answer states the call signature and the docstring's summary (an imperative
    "Return ..." becomes "`X(args)` returns ..."), then an example in doctest form. Examples come from
        the function's own doctests: its docstring's `>>>` statements, preceded by the imports they need
            (`from statistics import median`, chosen in the sandbox from the names the statements use), or
        synthesized calls (curated modules only): calls with simple arguments picked by parameter name
            (`HINTS`: `width` -> 12, `text` -> a sentence, `data` -> a list of numbers or bytes, ...) and
            probed in the sandbox until two succeed; an iterator result is shown as `list(...)`.
    Every example is executed and its shown output is the one recorded from that run, never the docstring's:
    statements after the first that raises are cut, trailing statements without output are dropped, and the
    example is kept only if some statement that names the subject prints something. It is run again in a
    fresh interpreter (another hash seed) and dropped unless every output is identical; outputs with memory
    addresses or sets of strings (order depends on the hash seed) are dropped too, as are examples longer than
    `MAX_EXAMPLE_CHARS`. Finally the whole chosen answer goes through `check_examples`, which must say
    passes=True (the same check the `teaching` eval scores a model with).
    The rejected answer is `wrong` (with probability `wrong_fraction`): the chosen answer with one shown
    output replaced (a literal perturbed: an int +1, a list reversed, a string shortened, True <-> False;
    otherwise another subject's output), kept only if `check_examples` says runs=True and passes=False; or
    `terse`: one short sentence with no explanation and no example ("Use `textwrap.shorten`.").
    Held-out split by file, as `data_pipelines.instructions.split_records` (a synthesized subject's file is
    its module's: `heapq.py` for heapq.heappush, `lib-dynload/math....so` for math.sqrt, `<built-in MODULE>`
    for a module compiled into the interpreter). Deterministic for a tree and a seed: the wording, the kind and
    the perturbation of a pair come from a hash of (seed, subject), and the sandbox's outputs are checked to be
    reproducible.
    A tree other than the standard library is appended to the sandbox's sys.path, so its modules import
    (`from geometry import area`) and a module named like a standard one (a tree's json.py) is shadowed by it
    and gives no pair; the `teaching` eval needs the same folder in `--teaching.paths`.
    Verilog and SystemVerilog files (.v, .sv) give pairs about their modules, made by `data_pipelines.verilog`
    (the language dispatch: `LANGUAGES`): "What does module fifo do?", "How do I instantiate fifo?", ...; the
    chosen answer explains the module (its header comment, its parameters, every port with direction and width)
    and shows an instantiation template built from the real port list; the rejected one is terse, or the same
    answer with a wrong port list or instantiation. Its checker (`verilog.check_answer`) plays the sandbox's part:
    every chosen answer passes it and every wrong one fails it. These records carry `"language": "verilog"` (and
    the wrong ones a `perturbation`). A mixed tree gives both kinds of pairs.
    Other trees (C, launch files) give no pairs: an answer about them cannot be checked here, and a pair whose
    answer was never checked is exactly what this module exists to avoid. `make_pairs` says so in its error;
    `data_pipelines.instructions` mines such trees.

The sandbox (`check_examples`, `check_many`, `Sandbox`)
    Examples written by a model are untrusted code. Each runs in its own process: a zygote, started as
    `python -I -S` (isolated: no user site, no PYTHON* variables, no current directory on sys.path) with a
    cleared environment, a fresh temporary working directory and resource limits set in a preexec_fn
    (address space, file size, open files, no core dumps), imports doctest once and then forks one child per
    example text. The child moves into its own new temporary directory, closes stdin/stdout/stderr, lowers
    its CPU-seconds limit to the timeout, arms a wall-clock timer and installs an audit hook
    (`sys.addaudithook`, which cannot be removed) before anything of the example runs. The hook refuses:
    process creation (subprocess, os.system, os.exec*, os.spawn*, os.posix_spawn, os.fork, pty; and
    _posixsubprocess.fork_exec, which raises no event of its own, is replaced before the hook goes in),
    signals to other processes, sockets (except an AF_UNIX socketpair, which asyncio's event loop needs:
    connect, bind and sendto stay refused), ctypes, importing multiprocessing/ctypes, changing resource
    limits, opening a file for writing, and removing, renaming, creating directories, chmod/chown, truncating
    or symlinking, anywhere outside the child's temporary directory (paths resolved through symlinks; opening
    a directory outside it is refused too, so dir_fd tricks have nothing to start from).
    Reading files is allowed (imports need it). The zygote kills a child that outlives its timeout (plus a
    grace second); the host kills a zygote that stops answering. Texts never share a process, so one answer
    cannot change how another is scored. This is a guard against accidents and careless code from small
    models, not a security boundary against an adversary who attacks CPython itself (audit hooks are not
    designed as one); the separate process, rlimits and the temporary directory are the harder walls.
    Scoring follows doctest: `DocTestParser` finds the `>>>` examples (code-fence lines are blanked first),
    a `DocTestRunner` runs them in one fresh namespace, and the host compares each shown output with what was
    printed using `doctest.OutputChecker` with NORMALIZE_WHITESPACE and DONT_ACCEPT_TRUE_FOR_1 (directives
    written in the text are ignored, so `+ELLIPSIS` cannot make `...` match anything). An expected
    exception counts as not running (`runs` means every statement ran without one). A set of strings is
    printed in an order that depends on the interpreter's hash seed: such an example can flip between runs.

    python -m data_pipelines.preferences --source DIR --out DIR [--val-fraction 0.1] [--max N] [--seed S]
        [--wrong-fraction 0.5] [--workers 2] [--pairs-per-subject K] [--demonstrations D]
writes OUT/train.jsonl and OUT/val.jsonl and prints counts per kind and split. `--pairs-per-subject K` asks each
subject in K phrasings; with `--demonstrations D`, each training subject's first D records become SFT
demonstrations instead (OUT/sft.jsonl: the prompt and its chosen answer), and OUT/rephrased.jsonl asks each
training subject in a phrasing none of its records uses (`rephrased`): the teaching rubric on new questions about
the subjects the model was taught, beside val.jsonl's unseen ones.

    python -m data_pipelines.preferences --own-answers SAMPLES --pairs PAIRS --out DIR
adds pairs whose rejected answer is a model's own failing one (`own_answer_pairs`; SAMPLES: the `teaching`
eval's samples of that model answering PAIRS' prompts) and writes them with PAIRS to DIR/train.jsonl.
"""

from __future__ import annotations

import argparse
import ast
import builtins
import doctest
import functools
import inspect
import itertools
import json
import os
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path

from tqdm import tqdm

from data_pipelines import verilog
from data_pipelines.corpus import iter_documents, stdlib_root
from data_pipelines.instructions import (
    count_table,
    example_blocks,
    module_name,
    split_by_file,
    write_jsonl,
)
from workbench.errors import DataError

KINDS = ("wrong", "terse")
LANGUAGES = {"python": (".py",), "verilog": verilog.EXTENSIONS}  # the trees whose answers can be checked
MAX_EXAMPLE_CHARS = 600  # the example part of a chosen answer
MAX_OUTPUT_CHARS = 300  # one statement's shown output
MAX_STATEMENTS = 8
MAX_SUMMARY_CHARS = 240
CHECK_FLAGS = doctest.NORMALIZE_WHITESPACE | doctest.DONT_ACCEPT_TRUE_FOR_1
MEMORY_BYTES = 1 << 30  # address space of a sandboxed process
FILE_BYTES = 16 << 20  # the largest file an example may write (in its temporary directory)
HOST_GRACE = 10.0  # seconds past an item's timeout before the host gives up on a zygote

PROMPTS = ("How do I use {s}?", "Explain {s} with an example.", "What does {s} do? Show an example.",
           "Show me how to call {s}.", "Give an example of using {s}.", "How does {s} work?")
TERSE = ("Use `{s}`.", "Just call `{s}`.", "It's `{s}`, in the {m} module.", "Call {s} with the right arguments.",
         "{s} does what its name says.")

CURATED = ("math", "cmath", "statistics", "string", "textwrap", "fractions", "decimal", "operator", "itertools",
           "functools", "bisect", "heapq", "colorsys", "base64", "binascii", "html", "shlex", "fnmatch",
           "posixpath", "difflib", "calendar", "json", "re", "keyword", "unicodedata", "zlib", "urllib.parse",
           "ipaddress", "datetime", "collections", "pprint", "codecs")
NOT_PROBED = {"itertools.count", "itertools.cycle", "calendar.setfirstweekday", "decimal.setcontext",
              "decimal.localcontext", "json.dump", "json.load", "re.purge", "heapq.heapify", *(
                  f"posixpath.{n}" for n in ("abspath", "realpath", "relpath", "expanduser", "expandvars", "exists",
                                            "lexists", "isfile", "isdir", "islink", "ismount", "getsize", "getmtime",
                                            "getatime", "getctime", "samefile", "sameopenfile", "samestat"))}
EXCLUDED_DIRS = {"test", "tests", "idle_test", "idlelib", "lib2to3", "tkinter", "turtledemo", "ensurepip",
                 "distutils", "site-packages", "__pycache__", "__phello__"}
EXCLUDED_MODULES = {"antigravity", "this", "turtle", "__main__", "__hello__"}
ALIASES = {"_pydecimal": "decimal"}  # a private file whose doctests document a public module's API

_NUM = ["7", "3", "2.5"]
_TEXT = ["'Hello  world'", "'hello'"]
_SEQ = ["[3, 1, 4, 1, 5]", "'ABCD'"]
HINTS: dict[str, list[str]] = {  # parameter name -> argument sources tried in order
    **dict.fromkeys("x y a b n k m r z i j p q d e num number value val start stop step base exp lo hi".split(), _NUM),
    **dict.fromkeys("s text string str line word sentence source src msg name chars".split(), _TEXT),
    **dict.fromkeys("iterable seq sequence data values items heap population it".split(), _SEQ),
    **dict.fromkeys("func function key predicate pred".split(), ["abs", "str.upper"]),
    **dict.fromkeys("obj o".split(), ["{'name': 'Ada', 'langs': ['en', 'fr']}"]),
    **dict.fromkeys("pattern pat".split(), ["'*.py'"]),
    **dict.fromkeys("path filename".split(), ["'/usr/lib/python3/json/__init__.py'"]),
    "width": ["12"], "ndigits": ["2"], "year": ["2024"], "theyear": ["2024"], "y1": ["2000"], "y2": ["2024"],
    "month": ["2"], "themonth": ["2"], "day": ["29"], "w": ["2"], "l": ["1"], "sep": ["', '"], "prefix": ["'> '"],
    "suffix": ["'.py'"], "fillchar": ["'*'"], "repl": ["'#'"], "encoding": ["'utf-8'"], "times": ["3"],
    "selectors": ["[1, 0, 1, 0, 1, 1]"], "object": ["'ab'"], "names": ["['setup.py', 'README.md', 'util.py']"],
    "paths": ["['/usr/lib/python3', '/usr/lib/perl5']"],
}
MODULE_HINTS: dict[str, dict[str, list[str]]] = {
    "math": {"x": ["16", "2.5", "7"], "p": ["(1, 2)"], "q": ["(4, 6)"], "seq": ["[0.1, 0.2, 0.3]"],
             "iterable": ["[1, 2, 3, 4]"]},
    "cmath": {"z": ["-4", "(1+2j)"], "x": ["-4", "(1+2j)"]},
    "statistics": {"data": ["[2, 3, 5, 7, 11, 13]", "[1.5, 2.5, 2.5, 2.75, 3.25, 4.75]"], "x": ["[1, 2, 3, 4, 5]"],
                   "y": ["[2, 4, 5, 4, 5]"], "sigma": ["1.0"], "mu": ["0.0"]},
    "re": {"pattern": [r"r'\d+'", "r'[aeiou]'"], "string": ["'a1b22c333'", "'education'"], "repl": ["'#'"]},
    "base64": {"s": ["b'hello world'", "b'aGVsbG8gd29ybGQ='"], "b": ["b'hello world'", "b'aGVsbG8gd29ybGQ='"]},
    "binascii": {"data": ["b'hello'", "b'68656c6c6f'"], "hexstr": ["b'68656c6c6f'"]},
    "zlib": {"data": ["b'hello hello hello hello'"]},
    "colorsys": {"r": ["0.2"], "g": ["0.4"], "b": ["0.6"], "h": ["0.5"], "s": ["0.5"], "v": ["0.8"], "l": ["0.5"],
                 "y": ["0.5"], "i": ["0.1"], "q": ["0.2"]},
    "difflib": {"word": ["'appel'"], "possibilities": ["['ape', 'apple', 'peach', 'puppy']"],
                "a": ["['one\\n', 'two\\n', 'three\\n']"], "b": ["['one\\n', 'tree\\n', 'three\\n']"]},
    "html": {"s": ["'<a href=\"x\">Tom & Jerry</a>'", "'&lt;b&gt;bold&lt;/b&gt;'"]},
    "shlex": {"s": ["'ls -l \"my file.txt\"'", "'my file.txt'"], "split_command": ["['ls', '-l', 'my file.txt']"]},
    "json": {"s": ["'{\"a\": 1, \"b\": [1, 2]}'"]},
    "keyword": {"s": ["'for'", "'match'"]},
    "unicodedata": {"chr": ["'é'", "'½'"], "unistr": ["'Café'"], "form": ["'NFD'"],
                    "name": ["'LATIN SMALL LETTER E WITH ACUTE'"]},
    "textwrap": {"text": ["'The quick brown fox jumps over the lazy dog'"], "width": ["15"]},
    "string": {"s": ["'hello   wide world'"]},
    "bisect": {"a": ["[1, 3, 5, 7]"], "x": ["4"]},
    "heapq": {"n": ["2"], "iterable": ["[5, 1, 8, 3, 9]"], "heap": ["[1, 3, 5]"], "item": ["4"]},
    "itertools": {"iterable": ["'ABC'", "[1, 2, 3, 4]"], "r": ["2"], "data": ["'ABCDEF'"], "function": ["pow"],
                  "predicate": ["str.isupper"], "stop": ["2"], "object": ["'ab'"], "n": ["2"]},
    "functools": {"function": ["operator.add", "max"], "iterable": ["[1, 2, 3, 4]"], "sequence": ["[1, 2, 3, 4]"]},
    "operator": {"a": ["7", "[1, 2, 3]"], "b": ["3", "2"], "obj": ["'hello'"]},
    "fnmatch": {"name": ["'example.py'"], "pat": ["'*.py'"], "names": ["['setup.py', 'README.md', 'util.py']"]},
    "posixpath": {"p": ["'/usr/lib/python3/json/__init__.py'"], "a": ["'/usr'"], "s": ["'/usr//lib/../bin/'"],
                  "path": ["'/usr//lib/../bin/'"], "m": ["['/usr/lib/python3', '/usr/lib/perl5']"]},
    "urllib.parse": {"url": ["'https://example.com/a/b?q=1#top'", "'../c'"], "string": ["'a b&c'"],
                     "query": ["{'q': 'hello world', 'page': 2}"], "base": ["'https://example.com/a/b'"],
                     "qs": ["'a=1&b=2'"], "s": ["'a b&c'"]},
    "ipaddress": {"address": ["'192.168.0.1'", "'192.168.0.0/24'"]},
    "fractions": {"numerator": ["3", "'0.75'"]},
    "decimal": {"value": ["'3.14'"]},
    "datetime": {"hour": ["13"], "minute": ["30"], "second": ["5"], "date_string": ["'2024-02-29'"]},
    "pprint": {"object": ["{'b': [1, 2], 'a': {'x': 1}}"]},
    "codecs": {"obj": ["'hello'"], "encoding": ["'rot13'"]},
}
VARARGS = {"integers": "12, 18", "iterables": "[1, 4, 7], [2, 5, 8]", "coordinates": "3, 4", "p": "'lib', 'python3'",
           "args": "3, 4", "items": "1", "attrs": "'real'"}
GENERIC = ["7", "'hello world'", "[3, 1, 4, 1, 5]", "b'hello'"]
VERBS = set("""return compute convert create make get set test check find split join build encode decode parse format
remove add apply calculate count generate read escape unescape quote unquote wrap fill shorten indent dedent collapse
normalize translate compare match search replace substitute sort insert locate merge push pop transform yield produce
construct determine strip expand map filter reduce accumulate take drop group pack unpack compress decompress look
evaluate round truncate capitalize print tell decide locate list compile scan""".split())

# ---- the sandboxed process ----------------------------------------------------------------------------------

ZYGOTE = r'''
import doctest, importlib, importlib.util, inspect, io, contextlib, itertools, json, math, os, resource, select, signal, sys
import shutil, tempfile, time, traceback

BASE = os.getcwd()
GRACE = 1.0
LIMIT = 20000
IN, OUT = sys.stdin.buffer, sys.stdout.buffer


class Timeout(BaseException):
    pass


class Stop(BaseException):
    pass


def on_alarm(signum, frame):
    raise Timeout("timed out")


class Recorder(doctest.DocTestRunner):
    """Runs examples in order and records what each printed; stops at the first exception."""

    def __init__(self):
        super().__init__(verbose=False, optionflags=0)
        self.rows = []

    def report_start(self, out, test, example):
        pass

    def report_success(self, out, test, example, got):
        self.rows.append({"got": got[:LIMIT], "exc": None})

    report_failure = report_success

    def report_unexpected_exception(self, out, test, example, exc_info):
        etype, value = exc_info[:2]
        if issubclass(etype, Timeout):
            msg = "timeout"
        else:
            msg = traceback.format_exception_only(etype, value)[-1].strip()[:500]
        self.rows.append({"got": "", "exc": msg})
        raise Stop


def run_examples(examples):
    for ex in examples:
        ex.exc_msg = None  # every exception is reported as one, never compared with an expected traceback
    test = doctest.DocTest(examples, {"__name__": "__main__"}, "example", None, 0, None)
    runner = Recorder()
    try:
        runner.run(test, out=lambda s: None, clear_globs=False)
    except Stop:
        pass
    except Timeout:
        runner.rows.append({"got": "", "exc": "timeout"})
    return runner.rows


def install_hook(tmp):
    real = os.path.realpath
    tmp = real(tmp)
    socket_unix = 1  # AF_UNIX on every POSIX system
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_TRUNC
    blocked = ("subprocess.", "os.system", "os.exec", "os.spawn", "os.posix_spawn", "os.fork", "os.forkpty",
               "os.kill", "os.killpg", "os.link", "os.symlink", "os.startfile", "os.chroot", "pty.", "socket.",
               "ctypes.", "resource.setrlimit", "resource.prlimit", "signal.pthread_kill", "sqlite3.load_extension",
               "sqlite3.enable_load_extension", "_winapi.", "winreg.", "webbrowser.")
    path_args = {"os.remove": (0,), "os.rmdir": (0,), "os.rename": (0, 1), "os.mkdir": (0,), "os.chmod": (0,),
                 "os.chown": (0,), "os.truncate": (0,), "os.utime": (0,), "os.chdir": (0,), "os.chflags": (0,),
                 "os.setxattr": (0,), "os.removexattr": (0,), "shutil.rmtree": (0,), "shutil.copyfile": (1,),
                 "shutil.copytree": (1,), "shutil.move": (0, 1), "shutil.chown": (0,), "os.mkfifo": (0,),
                 "os.mknod": (0,), "shutil.make_archive": (0,), "shutil.unpack_archive": (1,)}
    denied_imports = {"ctypes", "_ctypes", "multiprocessing", "_multiprocessing",
                      "_xxsubinterpreters", "_testcapi", "_testinternalcapi", "_dbm", "_gdbm"}

    def inside(path):
        if isinstance(path, int) or path is None:
            return False
        try:
            full = real(os.fsdecode(path))
        except Exception:
            return False
        return full == tmp or full.startswith(tmp + os.sep)

    def refuse(what):
        raise PermissionError(f"sandbox: {what} refused")

    def hook(event, args):
        if event == "open":
            path, mode, flags = (tuple(args) + (None, None, None))[:3]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if writing and not inside(path):
                refuse(f"opening {path!r} for writing outside the sandbox directory")
            if not writing and not isinstance(path, int) and not inside(path) and os.path.isdir(path):
                refuse(f"opening the directory {path!r} outside the sandbox directory")
        elif event == "import":
            name = str(args[0])
            if name in denied_imports or name.split(".")[0] in denied_imports:
                refuse(f"importing {name}")
        elif event == "sqlite3.connect":
            db = args[0]
            if db not in (":memory:", "", b":memory:") and not inside(db):
                refuse(f"sqlite3.connect({db!r}) outside the sandbox directory")
        elif event == "socket.__new__" and len(args) > 1 and args[1] == socket_unix:
            pass  # socketpair() for asyncio's self-pipe; connect, bind and sendto stay refused for every socket
        elif event.startswith(blocked):
            refuse(event)
        elif event in path_args:
            for i in path_args[event]:
                if i < len(args) and not inside(args[i]):
                    refuse(f"{event} on {args[i]!r} outside the sandbox directory")
            if event in ("os.remove", "os.rmdir", "os.mkdir") and args[-1] not in (None, -1):
                refuse(f"{event} relative to a directory descriptor")

    import _posixsubprocess  # its fork_exec starts processes without an audit event of its own: disarm it

    def fork_exec(*args, **kwargs):
        refuse("_posixsubprocess.fork_exec")

    _posixsubprocess.fork_exec = fork_exec
    sys.addaudithook(hook)


def call_kind(value):
    return hasattr(type(value), "__next__") and not isinstance(value, (str, bytes, list, tuple, dict))


def op_check(req):
    examples = doctest.DocTestParser().get_examples(req["text"])
    return {"rows": run_examples(examples)}


def imports_for(module, names):
    mod = importlib.import_module(module)
    lines, plain = [], []
    for n in names:
        if not hasattr(mod, n):
            try:
                if importlib.util.find_spec(n) is not None:
                    lines.append(f"import {n}")  # `textwrap.shorten(...)` in textwrap's own docstring
            except (ImportError, ValueError):
                pass
            continue
        obj = getattr(mod, n)
        home = getattr(obj, "__module__", None)
        if inspect.ismodule(obj):
            lines.append(f"import {obj.__name__}" if obj.__name__ == n else f"import {obj.__name__} as {n}")
        elif (isinstance(home, str) and home != module and not home.startswith("_") and not
              any(part.startswith("_") for part in home.split(".")) and
              getattr(sys.modules.get(home), n, None) is obj):
            lines.append(f"from {home} import {n}")  # Counter from collections, not from statistics
        else:
            plain.append(n)
    if plain:
        lines.insert(0, f"from {module} import {', '.join(sorted(plain))}")
    return lines


def op_record(req):
    imports = imports_for(req["module"], req.get("names", [])) if req.get("module") else []
    sources = imports + list(req["sources"])
    rows = run_examples([doctest.Example(s, "") for s in sources])
    return {"imports": imports, "rows": rows}


def op_list(req):
    mod = importlib.import_module(req["module"])
    public = getattr(mod, "__all__", None)
    names = sorted(set(public if public is not None else dir(mod)))
    short = mod.__name__.rsplit(".", 1)[-1]
    entries = []
    for n in names:
        obj = getattr(mod, n, None)
        if n.startswith("_") or obj is None:
            continue
        if inspect.isclass(obj):
            if issubclass(obj, BaseException):
                continue
            kind = "class"
        elif inspect.isroutine(obj):
            kind = "function"
        else:
            continue
        if public is None and getattr(obj, "__module__", None) not in (mod.__name__, "_" + short):
            continue
        doc = inspect.getdoc(obj) or ""
        if not doc.strip():
            continue
        try:
            sig = inspect.signature(obj)
            params = [[p.name, p.kind.name, p.default is not p.empty] for p in sig.parameters.values()]
            sig = str(sig)
        except (TypeError, ValueError):
            sig, params = None, None
        try:
            file, line = inspect.getsourcefile(obj), inspect.getsourcelines(obj)[1]
        except (TypeError, OSError):
            file, line = getattr(mod, "__file__", None), 0
        entries.append({"name": n, "kind": kind, "signature": sig, "params": params, "doc": doc[:4000],
                        "file": file, "line": line})
    return {"file": getattr(mod, "__file__", None), "entries": entries}


def op_probe(req):
    ns = {}
    for m in req["imports"]:
        ns[m.split(".")[0]] = importlib.import_module(m)
    found, shown = [], set()
    for call in req["calls"]:
        if len(found) >= req["want"]:
            break
        buf = io.StringIO()
        signal.setitimer(signal.ITIMER_REAL, req["each"])
        try:
            with contextlib.redirect_stdout(buf):
                value = eval(call, dict(ns))
                text = call
                if call_kind(value):
                    items = list(itertools.islice(value, 101))
                    if len(items) > 100:
                        raise ValueError("too many items")
                    text, value = f"list({call})", items
            signal.setitimer(signal.ITIMER_REAL, 0)
        except BaseException:
            signal.setitimer(signal.ITIMER_REAL, 0)
            continue
        printed = buf.getvalue()
        if value is None and not printed:
            continue
        r = "" if value is None else repr(value)
        if (r, printed) in shown:
            continue
        shown.add((r, printed))
        found.append({"call": text, "repr": r[:LIMIT], "printed": printed[:LIMIT]})
    return {"calls": found}


OPS = {"check": op_check, "record": op_record, "list": op_list, "probe": op_probe}


def child(req, tmp):
    os.chdir(tmp)
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    t = float(req["timeout"])
    cpu = int(math.ceil(t)) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu))
    try:
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))  # no effect for root; the hook refuses forks anyway
    except (ValueError, OSError):
        pass
    for p in req.get("paths", ()):
        sys.path.append(p)
    os.environ.update(HOME=tmp, TMPDIR=tmp)
    tempfile.tempdir = tmp
    install_hook(tmp)
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, t)
    try:
        result = OPS[req["op"]](req)
    except Timeout:
        result = {"error": "timeout"}
    except BaseException as e:
        result = {"error": f"{type(e).__name__}: {e}"[:500]}
    signal.setitimer(signal.ITIMER_REAL, 0)
    return result


def serve():
    for line in iter(IN.readline, b""):
        req = json.loads(line)
        tmp = tempfile.mkdtemp(dir=BASE)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                data = json.dumps(child(req, tmp)).encode()
            except BaseException as e:
                data = json.dumps({"error": f"{type(e).__name__}: {e}"[:500]}).encode()
            view = memoryview(data)
            while view:
                view = view[os.write(w, view):]
            os._exit(0)
        os.close(w)
        chunks, killed = [], False
        deadline = time.monotonic() + float(req["timeout"]) + GRACE
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, 9)
                killed = True
                break
            if select.select([r], [], [], left)[0]:
                chunk = os.read(r, 1 << 16)
                if not chunk:
                    break
                chunks.append(chunk)
        os.close(r)
        _, status = os.waitpid(pid, 0)
        shutil.rmtree(tmp, ignore_errors=True)  # what the example wrote goes with it
        if killed:
            out = {"error": "timeout"}
        else:
            try:
                out = json.loads(b"".join(chunks))
            except ValueError:
                out = {"error": f"the example ended its process (status {status})"}
        OUT.write(json.dumps(out).encode() + b"\n")
        OUT.flush()


serve()
'''


def _lower(which: int, value: int) -> None:
    _, hard = resource.getrlimit(which)
    value = value if hard == resource.RLIM_INFINITY else min(value, hard)
    resource.setrlimit(which, (value, value))


def _limits() -> None:
    """preexec_fn of a zygote: resource limits that every process it forks inherits."""
    _lower(resource.RLIMIT_AS, MEMORY_BYTES)
    _lower(resource.RLIMIT_FSIZE, FILE_BYTES)
    _lower(resource.RLIMIT_NOFILE, 256)
    _lower(resource.RLIMIT_CORE, 0)
    _lower(resource.RLIMIT_CPU, 3600)  # a child lowers its own to its timeout


class Sandbox:
    """A pool of `workers` zygote processes that run sandboxed requests (see the module notes), one forked
    child per request. `run(items)` returns one result per item, in order; an item is a dict with "op"
    ("check", "record", "list", "probe"), "timeout" (seconds) and the op's fields."""

    def __init__(self, workers: int = 2, paths: Sequence[str | Path] = ()):
        self.workers = max(1, int(workers))
        self.paths = [str(Path(p).resolve()) for p in paths]
        self.base = tempfile.mkdtemp(prefix="workbench-sandbox-")
        self.idle: list[subprocess.Popen] = []
        self.all: list[subprocess.Popen] = []

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _start(self) -> subprocess.Popen:
        env = {"PATH": "/usr/bin:/bin", "HOME": self.base, "TMPDIR": self.base, "LC_ALL": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", ZYGOTE], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, cwd=self.base, env=env,
                                preexec_fn=_limits, start_new_session=True)
        self.all.append(proc)
        return proc

    def _kill(self, proc: subprocess.Popen) -> None:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the zygote's own session: it and the child it forked
        except ProcessLookupError:
            pass
        proc.wait()
        self.all.remove(proc)

    def run(self, items: Sequence[dict], desc: str | None = None) -> list[dict]:
        results: list[dict | None] = [None] * len(items)
        pending = deque(range(len(items)))
        busy: dict[int, tuple[subprocess.Popen, int, float]] = {}  # stdout fd -> (zygote, item, deadline)
        bar = tqdm(total=len(items), desc=desc, disable=desc is None, leave=False, dynamic_ncols=True)
        while pending or busy:
            while pending and len(busy) < self.workers:
                proc = self.idle.pop() if self.idle else self._start()
                i = pending.popleft()
                try:
                    proc.stdin.write(json.dumps(dict(items[i], paths=self.paths)).encode() + b"\n")
                    proc.stdin.flush()
                except (BrokenPipeError, OSError):
                    self._kill(proc)
                    results[i] = {"error": "the sandbox process died"}
                    bar.update(1)
                    continue
                busy[proc.stdout.fileno()] = (proc, i, time.monotonic() + float(items[i]["timeout"]) + HOST_GRACE)
            ready = select.select(list(busy), [], [], 0.25)[0] if busy else []
            for fd in ready:
                proc, i, _ = busy.pop(fd)
                line = proc.stdout.readline()
                if line:
                    try:
                        results[i] = json.loads(line)
                    except ValueError:
                        results[i] = {"error": "unreadable answer from the sandbox"}
                    self.idle.append(proc)
                else:
                    results[i] = {"error": "the sandbox process died"}
                    self._kill(proc)
                bar.update(1)
            now = time.monotonic()
            for fd, (proc, i, deadline) in list(busy.items()):
                if now > deadline:
                    del busy[fd]
                    results[i] = {"error": "timeout"}
                    self._kill(proc)
                    bar.update(1)
        bar.close()
        return results  # type: ignore[return-value]

    def close(self) -> None:
        for proc in list(self.all):
            try:
                proc.stdin.close()
                proc.wait(timeout=2)
                self.all.remove(proc)
            except (OSError, subprocess.TimeoutExpired):
                self._kill(proc)
        self.idle = []

        def writable(func, path, exc):  # an example may have made its files read-only
            try:
                os.chmod(os.path.dirname(path), 0o700)
                os.chmod(path, 0o700)
                func(path)
            except OSError:
                pass

        shutil.rmtree(self.base, onerror=writable)


# ---- the checker ---------------------------------------------------------------------------------------------

FENCE_RE = re.compile(r"^[ \t]*```.*$", re.MULTILINE)


def _parse(text: str) -> tuple[str, list[doctest.Example] | None, str | None]:
    """(the text as run: code-fence lines blanked, its examples, a parse error)."""
    cleaned = FENCE_RE.sub("", text)
    try:
        return cleaned, doctest.DocTestParser().get_examples(cleaned), None
    except ValueError as e:
        return cleaned, None, str(e).split("\n")[0]


def _first_line(example: doctest.Example) -> str:
    line = example.source.split("\n")[0]
    return line if len(line) <= 60 else line[:57] + "..."


def _verdict(examples: list[doctest.Example], result: dict, timeout: float) -> dict:
    if "error" in result:
        reason = f"timed out after {timeout:g} s" if result["error"] == "timeout" else result["error"]
        return {"found": True, "runs": False, "passes": False, "detail": reason}
    rows = result["rows"]
    for k, (ex, row) in enumerate(zip(examples, rows), 1):
        if row["exc"]:
            reason = f"timed out after {timeout:g} s" if row["exc"] == "timeout" else f"raised {row['exc']}"
            return {"found": True, "runs": False, "passes": False,
                    "detail": f"example {k} (`{_first_line(ex)}`) {reason}"}
    if len(rows) < len(examples):
        return {"found": True, "runs": False, "passes": False, "detail": f"stopped after example {len(rows)}"}
    checker = doctest.OutputChecker()
    for k, (ex, row) in enumerate(zip(examples, rows), 1):
        if not checker.check_output(ex.want, row["got"], CHECK_FLAGS):
            return {"found": True, "runs": True, "passes": False,
                    "detail": f"example {k} (`{_first_line(ex)}`) shows {ex.want.strip()[:80]!r} but prints "
                              f"{row['got'].strip()[:80]!r}"}
    return {"found": True, "runs": True, "passes": True,
            "detail": f"{len(examples)} example(s) ran and printed what they show"}


def check_many(texts: Sequence[str], timeout: float = 5.0, workers: int = 2, paths: Sequence[str | Path] = (),
               progress: str | None = None) -> list[dict]:
    """`check_examples` of each text, `workers` at a time (one forked process per text; see the module notes).
    `paths`: folders appended to the sandbox's sys.path (read-only), for examples that import a tree's
    modules; `progress`: a tqdm description, or None for no bar."""
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    parsed = [_parse(t) for t in texts]
    out: list[dict | None] = [None] * len(texts)
    todo = []
    for i, (_, examples, error) in enumerate(parsed):
        if error is not None:
            out[i] = {"found": True, "runs": False, "passes": False, "detail": f"not a valid doctest: {error}"}
        elif not examples:
            out[i] = {"found": False, "runs": False, "passes": False, "detail": "no >>> example"}
        else:
            todo.append(i)
    if todo:
        with Sandbox(min(workers, len(todo)), paths) as sandbox:
            results = sandbox.run([{"op": "check", "text": parsed[i][0], "timeout": timeout} for i in todo], progress)
        for i, result in zip(todo, results):
            out[i] = _verdict(parsed[i][1], result, timeout)
    return out  # type: ignore[return-value]


def check_examples(text: str, timeout: float = 5.0, paths: Sequence[str | Path] = ()) -> dict:
    """Whether the `>>>` examples in `text` run and print what they show, run in the sandbox:
    {"found": at least one example, "runs": every statement ran without an exception (or timeout),
    "passes": runs and every shown output equals the printed one (doctest comparison, whitespace
    normalised), "detail": a short reason}."""
    return check_many([text], timeout, workers=1, paths=paths)[0]


# ---- subjects -------------------------------------------------------------------------------------------------


@dataclass
class Subject:
    """A documented function or class and how an example of it can be made."""

    subject: str  # module.qualname
    module: str
    name: str  # the last part of the qualname: an example must use it
    signature: str  # "(text, width, **kwargs)"
    summary: str
    source: str  # path:LINE
    examples: list[str] = field(default_factory=list)  # doctest statements (own doctests)
    names: list[str] = field(default_factory=list)  # free names of the statements, imported from the module
    calls: list[str] = field(default_factory=list)  # synthesized calls to probe
    imports: list[str] = field(default_factory=list)  # modules the probed calls need


def summary_of(doc: str, name: str = "") -> str:
    """The docstring's first paragraph on one line, without leading signature lines ("f(a, b) -> x");
    cut to its first sentence when longer than MAX_SUMMARY_CHARS; "" when there is none that fits."""
    lines = inspect.cleandoc(doc).split("\n")
    while lines and (not lines[0].strip() or (name and re.match(rf"^\s*{re.escape(name)}\(.*\)", lines[0]))):
        lines.pop(0)
    paragraph = []
    for line in lines:
        if not line.strip() or line.strip().startswith(">>>"):
            break
        paragraph.append(line.strip())
    text = " ".join(paragraph)
    if len(text) > MAX_SUMMARY_CHARS:
        text = re.split(r"(?<=\.)\s", text, maxsplit=1)[0]
    return text if 0 < len(text) <= MAX_SUMMARY_CHARS else ""


def doc_signature(doc: str, name: str) -> tuple[str | None, list | None]:
    """(display signature, params) parsed from a builtin's first doc line "name(a, b[, c]) -> ...", for the
    functions `inspect.signature` cannot read."""
    m = re.match(rf"^\s*{re.escape(name)}(\(.*?\))(\s*-+>.*)?$", doc.split("\n")[0]) if doc else None
    if not m:
        return None, None
    sig = m.group(1)
    required = sig[1:-1].split("[")[0]
    params = []
    for part in (p.strip() for p in required.split(",")):
        if not part or part == "/" or part == "*":
            continue
        if part.startswith("**"):
            params.append([part[2:], "VAR_KEYWORD", False])
        elif part.startswith("*"):
            params.append([part[1:], "VAR_POSITIONAL", False])
        else:
            params.append([part.split("=")[0].strip(), "POSITIONAL_OR_KEYWORD", "=" in part])
    return sig, params


def display_signature(sig: str) -> str:
    """A signature as a reader wants it: private parameters (`_normalize=True`) and the positional-only marker
    `/` dropped."""
    sig = re.sub(r",\s*_\w+(=[^,)]*)?(?=\s*[,)])", "", sig)
    sig = re.sub(r",\s*\*(?=\s*\))", "", sig)
    sig = re.sub(r",\s*/(?=\s*[,)])", "", sig)
    return re.sub(r"^\(/,\s*", "(", sig).replace("(/)", "()")


def third_person(verb: str) -> str:
    if verb.endswith(("s", "sh", "ch", "x", "z", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2:-1] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def explanation(subject: str, signature: str, summary: str) -> str:
    """"`textwrap.shorten(text, width)` collapses ..." from an imperative summary, else "`X(...)`: Summary"."""
    summary = summary.replace("``", "`")
    first, _, rest = summary.partition(" ")
    if first[:1].isupper() and first.lower() in VERBS and rest:
        rest = re.sub(r"\b(and|or) ([a-z]+)\b", lambda m: f"{m[1]} {third_person(m[2]) if m[2] in VERBS else m[2]}", rest)
        return f"`{subject}{signature}` {third_person(first.lower())} {rest}"
    return f"`{subject}{signature}`: {summary}"


def free_names(sources: Sequence[str]) -> list[str]:
    """The names the statements read but never bind, builtins excluded (what they need imported)."""
    loads, bound = set(), set()
    for src in sources:
        try:
            tree = ast.parse(src)
        except SyntaxError:
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name):
                (loads if isinstance(node.ctx, ast.Load) else bound).add(node.id)
            elif isinstance(node, ast.alias):
                bound.add((node.asname or node.name).split(".")[0])
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                bound.add(node.name)
            elif isinstance(node, ast.arg):
                bound.add(node.arg)
    return sorted(loads - bound - set(dir(builtins)))


def _is_staticmethod(node) -> bool:
    return any(isinstance(d, ast.Name) and d.id == "staticmethod" for d in node.decorator_list)


def ast_signature(node, method: bool) -> str:
    """The def's parameters as written, without the `self`/`cls` of a method (static methods keep theirs)."""
    args = ast.arguments(**{f: list(getattr(node.args, f)) if isinstance(getattr(node.args, f), list)
                            else getattr(node.args, f) for f in node.args._fields})
    positional = args.posonlyargs + args.args
    if method and not _is_staticmethod(node) and positional:
        if len(args.defaults) == len(positional):
            args.defaults = args.defaults[1:]
        if args.posonlyargs:
            args.posonlyargs = args.posonlyargs[1:]
        else:
            args.args = args.args[1:]
    return f"({ast.unparse(args)})"


def excluded(path: str) -> bool:
    parts = path.split("/")
    if any(p in EXCLUDED_DIRS for p in parts[:-1]):
        return True
    if any(p.startswith("_") and p != "__init__.py" for p in parts) and module_name(path) not in ALIASES:
        return True
    return module_name(path) in EXCLUDED_MODULES


def doctest_subjects(root: Path, prefix: str, include: Sequence[str] | None, stats: Counter) -> list[Subject]:
    """Public documented functions and methods with at least one `>>>` example, from the tree's Python files."""
    from fnmatch import fnmatch

    subjects = []
    for doc in iter_documents(root, (".py",)):
        if excluded(doc.path) or (include is not None and not any(fnmatch(doc.path, p) for p in include)):
            continue
        if ">>>" not in doc.text:
            continue
        try:
            tree = ast.parse(doc.text)
        except (SyntaxError, ValueError):
            stats["unparsable_files"] += 1
            continue
        module = module_name(prefix + doc.path)
        module = ALIASES.get(module, module)

        def walk(body, classes):
            for node in body:
                if isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
                    yield from walk(node.body, [*classes, node.name])
                elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
                    yield node, classes

        for node, classes in walk(tree.body, []):
            raw = ast.get_docstring(node, clean=False)
            if not raw or ">>>" not in raw:
                continue
            statements = [ex.source.rstrip("\n") for block in example_blocks(raw) for ex in block
                          if not ex.options.get(doctest.SKIP)]
            statements = [re.sub(r"\s*#\s*doctest:.*$", "", s, flags=re.MULTILINE) for s in statements]
            summary = summary_of(raw)
            if not statements or not summary:
                continue
            qualname = ".".join([*classes, node.name])
            subjects.append(Subject(f"{module}.{qualname}", module, node.name,
                                    display_signature(ast_signature(node, bool(classes))),
                                    summary, f"{doc.path}:{node.lineno}",
                                    examples=statements[: 2 * MAX_STATEMENTS], names=free_names(statements)))
    stats["doctest_subjects"] += len(subjects)
    return subjects


def hints_for(module: str, name: str) -> list[str]:
    return MODULE_HINTS.get(module, {}).get(name) or HINTS.get(name) or []


def candidate_calls(module: str, name: str, params: list | None, limit: int = 40) -> list[str]:
    """Calls of module.name with simple arguments, most plausible first (see HINTS)."""
    target = f"{module}.{name}"
    if params is None:
        arities = [[GENERIC] * n for n in (1, 2, 0, 3)]
        return [f"{target}({', '.join(args)})" for pools in arities for args in itertools.islice(
            itertools.product(*pools), limit // 4)]
    required = [p for p in params if p[1] in ("POSITIONAL_ONLY", "POSITIONAL_OR_KEYWORD") and not p[2]]
    if any(p[1] == "KEYWORD_ONLY" and not p[2] for p in params):
        return []
    pools = [hints_for(module, p[0]) or GENERIC for p in required]
    varargs = next((p[0] for p in params if p[1] == "VAR_POSITIONAL"), None)
    extra = VARARGS.get(varargs, "3, 4") if varargs and (not required or varargs in VARARGS) else None
    calls = []
    for args in itertools.islice(itertools.product(*pools), limit):
        parts = list(args) + ([extra] if extra else [])
        calls.append(f"{target}({', '.join(parts)})")
    return calls


@functools.lru_cache(maxsize=64)
def _top_level_defs(file: str) -> dict[str, int]:
    try:
        tree = ast.parse(Path(file).read_bytes())
    except (OSError, SyntaxError, ValueError):
        return {}
    return {n.name: n.lineno for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))}


def def_line(file: str, name: str) -> int:
    """The line of the module-level def or class `name` in a Python file (the pure-Python twin of a function
    that runs from a C accelerator, like heapq.heappush), or 0."""
    return _top_level_defs(file).get(name, 0)


def curated_subjects(root: Path, modules: Sequence[str], sandbox: Sandbox, taken: set[str],
                     stats: Counter) -> list[Subject]:
    """Subjects of the curated modules whose code is part of the tree, with calls to probe."""
    results = sandbox.run([{"op": "list", "module": m, "timeout": 20.0} for m in modules], desc="listing modules")
    root_real = root.resolve()
    subjects = []
    for module, result in zip(modules, results):
        if "error" in result:
            stats["curated_modules_failed"] += 1
            continue
        mod_file = result.get("file")
        if mod_file is not None and not Path(mod_file).resolve().is_relative_to(root_real):
            continue  # not part of this tree
        if mod_file is None and root_real != stdlib_root().resolve():
            continue  # built into the interpreter: only part of the whole standard library
        for e in result["entries"]:
            subject = f"{module}.{e['name']}"
            if subject in taken or subject in NOT_PROBED:
                continue
            sig, params = e["signature"], e["params"]
            if sig is None:
                sig, params = doc_signature(e["doc"], e["name"])
            summary = summary_of(e["doc"], e["name"])
            if not summary:
                continue
            calls = candidate_calls(module, e["name"], params)
            if not calls:
                continue
            file = e["file"]
            if file and Path(file).resolve().is_relative_to(root_real):
                line = e["line"] or (def_line(file, e["name"]) if file.endswith(".py") else 0)
                source = f"{Path(file).resolve().relative_to(root_real).as_posix()}:{line}"
            else:
                source = f"<built-in {module}>:0"
            imports = [module] + (["operator"] if any("operator." in c for c in calls) and module != "operator" else [])
            subjects.append(Subject(subject, module, e["name"], display_signature(sig or "(...)"), summary, source,
                                    calls=calls, imports=imports))
    stats["synthesized_subjects"] += len(subjects)
    return subjects


# ---- examples -------------------------------------------------------------------------------------------------

ADDRESS_RE = re.compile(r" at 0x[0-9a-f]+|object at |<function |<built-in method ")
STR_SET_RE = re.compile(r"(?:frozenset\()?\{(?:'[^']*'|b'[^']*'|\"[^\"]*\")(?:, (?:'[^']*'|b'[^']*'|\"[^\"]*\"))+\}")


def render(statements: Sequence[str], outputs: Sequence[str]) -> str:
    """Statements and outputs as a doctest session (`...` continuations, <BLANKLINE> for empty lines)."""
    lines = []
    for src, got in zip(statements, outputs):
        src_lines = src.rstrip("\n").split("\n")
        lines += [">>> " + src_lines[0]] + ["... " + s for s in src_lines[1:]]
        if got:
            lines += [line.rstrip() if line.strip() else "<BLANKLINE>" for line in got.rstrip("\n").split("\n")]
    return "\n".join(lines)


def usable_output(got: str) -> bool:
    if len(got) > MAX_OUTPUT_CHARS or got.count("\n") > 10:
        return False
    if ADDRESS_RE.search(got) or STR_SET_RE.search(got):
        return False
    return not any(line.lstrip().startswith(">>>") for line in got.split("\n"))


def trim(subject: Subject, statements: list[str], rows: list[dict]) -> tuple[list[str], list[str]] | None:
    """The statements kept for an example and their outputs: up to the first exception, within the limits,
    ending with the last statement that prints; None unless a kept statement naming the subject prints."""
    kept, outputs = [], []
    for src, row in zip(statements, rows):
        if row["exc"] is not None or not usable_output(row["got"]) or len(kept) >= MAX_STATEMENTS:
            break
        if len(render([*kept, src], [*outputs, row["got"]])) > MAX_EXAMPLE_CHARS:
            break
        kept.append(src)
        outputs.append(row["got"])
    span = demonstrated(subject.name, kept, outputs)
    if span is None:
        return None
    return kept[: span[1] + 1], outputs[: span[1] + 1]


def demonstrated(name: str, statements: Sequence[str], outputs: Sequence[str]) -> tuple[int, int] | None:
    """(the first statement naming `name`, the last statement from there on that prints), or None: an example
    shows its subject when something is printed at or after the subject's first use."""
    name_re = re.compile(rf"\b{re.escape(name)}\b")
    first = next((k for k, src in enumerate(statements) if name_re.search(src)), None)
    if first is None:
        return None
    last = max((k for k in range(first, len(statements)) if outputs[k]), default=None)
    return None if last is None else (first, last)


def chosen_text(subject: Subject, statements: list[str], outputs: list[str]) -> str:
    return f"{explanation(subject.subject, subject.signature, subject.summary)}\nExample:\n{render(statements, outputs)}"


_NOTHING = object()


def perturb(got: str, rng: random.Random) -> str | None:
    """A wrong but plausible output in place of `got` (a literal changed), or None when there is no obvious one."""
    text = got.strip()
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        value = _NOTHING
    new = _NOTHING
    if isinstance(value, bool):
        new = not value
    elif isinstance(value, int):
        new = value + rng.choice([1, -1, 2])
    elif isinstance(value, float) and value == value and abs(value) != float("inf"):
        new = value + rng.choice([1.0, 0.5, -1.0])
    elif isinstance(value, complex):
        new = value + 1
    elif isinstance(value, str):
        new = value[:-1] if len(value) > 1 else value + "x"
    elif isinstance(value, bytes):
        new = value[:-1] if len(value) > 1 else value + b"x"
    elif isinstance(value, (list, tuple)) and value:
        new = type(value)(reversed(value)) if list(reversed(value)) != list(value) else value[:-1]
    elif isinstance(value, dict) and value:
        new = dict(list(value.items())[:-1])
    if new is not _NOTHING and repr(new) != text:
        return repr(new) + "\n"
    if value is _NOTHING:
        m = re.search(r"\d", text)
        if m:
            return text[: m.start()] + str((int(m.group()) + 1) % 10) + text[m.end() :] + "\n"
    return None


def wrong_outputs(c: Candidate, all_outputs: Sequence[str], rng: random.Random) -> list[str] | None:
    """The candidate's outputs with one made wrong: the last output from the subject's first use on that
    `perturb` can change, else the last output replaced by another output of the same shape (the same first
    character: a list for a list) from the other examples."""
    first, _ = demonstrated(c.subject.name, c.statements, c.outputs)
    naming = [k for k in range(first, len(c.outputs)) if c.outputs[k]]
    outputs = list(c.outputs)
    for k in reversed(naming):
        bad = perturb(outputs[k], rng)
        if bad is not None:
            outputs[k] = bad
            return outputs
    k = naming[-1]
    others = [o for o in all_outputs if o.strip() != outputs[k].strip() and usable_output(o)]
    alike = [o for o in others if o.strip()[:1] == outputs[k].strip()[:1]]
    if not (alike or others):
        return None
    outputs[k] = rng.choice(alike or others)
    return outputs


@dataclass
class Candidate:
    subject: Subject
    statements: list[str]
    outputs: list[str]


def _record_items(subjects: Sequence[Subject], timeout: float) -> list[dict]:
    items = []
    for s in subjects:
        if s.examples:
            items.append({"op": "record", "module": s.module, "names": s.names, "sources": s.examples,
                          "timeout": timeout})
        else:
            items.append({"op": "record", "module": None, "sources": [f"import {m}" for m in s.imports] + s.calls,
                          "timeout": timeout})
    return items


def build_examples(subjects: Sequence[Subject], first: Sandbox, second: Sandbox, timeout: float,
                   stats: Counter) -> list[Candidate]:
    """Run each subject's example, trim it, and run it again in another interpreter: the candidates whose
    outputs are the same both times."""
    probed = [s for s in subjects if s.calls]
    if probed:
        results = first.run([{"op": "probe", "imports": s.imports, "calls": s.calls, "want": 2, "each": 0.5,
                              "timeout": 0.5 * len(s.calls) + 5} for s in probed], desc="probing calls")
        for s, result in zip(probed, results):
            s.calls = [c["call"] for c in result.get("calls", [])]
            if not s.calls:
                stats["dropped_no_working_call"] += 1
    subjects = [s for s in subjects if s.examples or s.calls]
    runs = first.run(_record_items(subjects, timeout), desc="running examples")
    trimmed = []
    for s, result in zip(subjects, runs):
        if "error" in result:
            stats["dropped_example_failed"] += 1
            continue
        statements = result["imports"] + (s.examples or [f"import {m}" for m in s.imports] + s.calls)
        kept = trim(s, statements, result["rows"])
        if kept is None:
            stats["dropped_no_usable_output"] += 1
            continue
        trimmed.append(Candidate(s, *kept))
    again = second.run([{"op": "record", "module": None, "sources": c.statements, "timeout": timeout}
                        for c in trimmed], desc="running them again")
    out = []
    for c, result in zip(trimmed, again):
        if "error" in result or [r["got"] for r in result["rows"]] != c.outputs or any(r["exc"] for r in result["rows"]):
            stats["dropped_not_reproducible"] += 1
            continue
        out.append(c)
    return out


def make_pairs(source: str | Path | None = None, *, seed: int = 0, max_pairs: int | None = None,
               wrong_fraction: float = 0.5, modules: Sequence[str] | None = None,
               include: Sequence[str] | None = None, timeout: float = 5.0, workers: int = 2,
               stats: dict | None = None, pairs_per_subject: int = 1) -> list[dict]:
    """Preference records (see the module notes) about the documented functions of the tree `source` (default:
    the standard library), sorted by source. `modules`: curated modules to synthesize examples for (default
    `CURATED`; only those whose code lies in the tree); `include`: glob patterns of the relative paths whose
    doctests are used (all when None); `max_pairs`: keep at most that many (a seeded sample); `stats`: filled
    with counts of subjects, drops by reason and kinds; `pairs_per_subject`: records per subject, each asking in
    its own phrasing."""
    if not 0 <= wrong_fraction <= 1:
        raise DataError(f"preferences: wrong_fraction must be in [0, 1], got {wrong_fraction}")
    if max_pairs is not None and max_pairs < 1:
        raise DataError(f"preferences: max_pairs must be a positive integer, got {max_pairs}")
    root = stdlib_root() if source is None else Path(source)
    if not root.is_dir():
        raise DataError(f"preferences: source {root} {'is not a directory' if root.exists() else 'does not exist'}")
    counts: Counter = Counter()
    has = {lang: next(iter_documents(root, exts), None) is not None for lang, exts in LANGUAGES.items()}
    if not any(has.values()):
        raise DataError(f"preferences: {root} has no Python ({', '.join(LANGUAGES['python'])}) or Verilog "
                        f"({', '.join(LANGUAGES['verilog'])}) files. Preference pairs need answers that can be "
                        f"checked (Python examples that run, Verilog port lists and instantiations); for C or launch "
                        f"files use data_pipelines.instructions, whose comment/definition pairs need no checking")
    most = min(len(PROMPTS) if has["python"] else 99, len(verilog.PROMPTS) if has["verilog"] else 99)
    if not 1 <= pairs_per_subject <= most:
        raise DataError(f"preferences: pairs_per_subject must be in [1, {most}] (one phrasing each), got "
                        f"{pairs_per_subject}")
    records = []
    if has["python"]:
        records += python_records(root, seed, wrong_fraction, modules, include, timeout, workers, counts,
                                  pairs_per_subject)
    if has["verilog"]:
        docs = iter_documents(root, LANGUAGES["verilog"])
        if include is not None:
            docs = (d for d in docs if any(fnmatch(d.path, pattern) for pattern in include))
        records += verilog.preference_records(verilog.read_modules(docs, counts), seed, pairs_per_subject,
                                              wrong_fraction, stats=counts)
    if max_pairs is not None and len(records) > max_pairs:
        records = random.Random(seed).sample(records, max_pairs)
    records.sort(key=lambda r: (r["source"].rpartition(":")[0], int(r["source"].rpartition(":")[2] or 0),
                                r["subject"]))
    counts.update({f"kind_{k}": sum(r["kind"] == k for r in records) for k in KINDS})
    if stats is not None:
        stats.update(counts)
    if not records:
        raise DataError(f"preferences: no pair could be made from {root} ({counts['doctest_subjects']} functions with "
                        f"doctests, {counts['synthesized_subjects']} synthesized subjects; none gave an example "
                        f"that runs and reproduces; {counts['verilog_modules']} Verilog modules read"
                        + "".join(f", {n} {k.removeprefix('verilog_')}" for k, n in sorted(counts.items())
                                  if k.startswith("verilog_skipped_")) + ")")
    return records


def python_records(root: Path, seed: int, wrong_fraction: float, modules: Sequence[str] | None,
                   include: Sequence[str] | None, timeout: float, workers: int, counts: Counter,
                   pairs_per_subject: int) -> list[dict]:
    """The pairs about a tree's Python functions: doctest and curated subjects, run twice in the sandbox."""
    std = stdlib_root().resolve()
    in_stdlib = root.resolve().is_relative_to(std)
    prefix = (root.resolve().relative_to(std).as_posix() + "/") if in_stdlib and root.resolve() != std else ""
    paths = [] if in_stdlib else [root.resolve()]
    subjects = doctest_subjects(root, prefix, include, counts)
    taken = {s.subject for s in subjects}
    curated = [m for m in (CURATED if modules is None else modules)] if in_stdlib else []
    with Sandbox(workers, paths) as first, Sandbox(workers, paths) as second:
        if curated:
            subjects += curated_subjects(root, curated, first, taken, counts)
        candidates = build_examples(subjects, first, second, timeout, counts)
    # one candidate per subject: the own doctest when it worked, else the synthesized calls
    best: dict[str, Candidate] = {}
    for c in candidates:
        best.setdefault(c.subject.subject, c)
    candidates = sorted(best.values(), key=lambda c: c.subject.subject)
    return assemble(candidates, seed, wrong_fraction, timeout, workers, paths, counts, pairs_per_subject)


def assemble(candidates: Sequence[Candidate], seed: int, wrong_fraction: float, timeout: float, workers: int,
             paths: Sequence[Path], counts: Counter, pairs_per_subject: int = 1) -> list[dict]:
    """Records from verified candidates: the chosen answer, and a wrong or terse rejected one, both checked;
    `pairs_per_subject` records per subject, each asked in another of `PROMPTS`' phrasings, each drawing its own
    kind (and perturbation)."""
    plans = []
    all_outputs = [o for c in candidates for o in c.outputs if o.strip()]
    for c in candidates:
        s = c.subject
        rng = random.Random(f"{seed}\x1f{s.subject}")
        phrasings = rng.sample(PROMPTS, min(pairs_per_subject, len(PROMPTS)))
        chosen = chosen_text(s, c.statements, c.outputs)
        for phrasing in phrasings:
            wrong = None
            if rng.random() < wrong_fraction:
                outputs = wrong_outputs(c, all_outputs, rng)
                wrong = chosen_text(s, c.statements, outputs) if outputs is not None else None
            terse = rng.choice(TERSE).format(s=s.subject, m=s.module)
            plans.append((c, phrasing.format(s=s.subject), chosen, wrong, terse))
    texts = [p[2] for p in plans] + [p[3] for p in plans if p[3] is not None]
    checks = check_many(texts, timeout, workers, paths, progress="checking answers")
    chosen_checks, wrong_checks = checks[: len(plans)], iter(checks[len(plans) :])
    records = []
    for (c, prompt, chosen, wrong, terse), verdict in zip(plans, chosen_checks):
        wrong_verdict = next(wrong_checks) if wrong is not None else None
        if not verdict["passes"]:
            counts["dropped_chosen_check_failed"] += 1
            continue
        if wrong is not None and not (wrong_verdict["runs"] and not wrong_verdict["passes"]):
            counts["wrong_failed_check"] += 1
            wrong = None
        kind, rejected = ("wrong", wrong) if wrong is not None else ("terse", terse)
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind,
                        "subject": c.subject.subject, "source": c.subject.source})
    return records


def demonstrations(train: Sequence[dict], per_subject: int = 1) -> tuple[list[dict], list[dict]]:
    """(SFT demonstrations, the pairs left for DPO): each training subject's first `per_subject` records become
    conversations whose reply is the chosen answer; its other records (other phrasings) stay preference pairs.
    A model is first shown the teaching style and its subjects (SFT), then DPO prefers the right examples over
    wrong or terse ones about the same subjects: preference optimisation reshapes what a model already produces,
    it does not teach a format or a subject from nothing."""
    demos, pairs, seen = [], [], Counter()
    for r in train:
        if seen[r["subject"]] >= per_subject:
            pairs.append(r)
            continue
        seen[r["subject"]] += 1
        demos.append({"messages": [{"role": "user", "content": r["prompt"]},
                                   {"role": "assistant", "content": r["chosen"]}],
                      "prompt": r["prompt"], "answer": r["chosen"], "kind": "teaching", "subject": r["subject"],
                      "source": r["source"]})
    return demos, pairs


def rephrased(records: Sequence[dict], seed: int = 0) -> list[dict]:
    """One record per subject, asked in a phrasing of `PROMPTS` that none of the subject's records uses: a new
    question about a subject DPO saw (the teaching rubric there, beside val.jsonl's unseen subjects). Subjects
    whose records use every phrasing are left out."""
    asked: dict[str, set] = {}
    for r in records:
        asked.setdefault(r["subject"], set()).add(r["prompt"])
    out = []
    for r in records:
        if r["subject"] not in asked:
            continue
        rng = random.Random(f"{seed}\x1frephrase\x1f{r['subject']}")
        phrasings = verilog.PROMPTS if r.get("language") == "verilog" else PROMPTS
        others = [p.format(s=r["subject"]) for p in phrasings if p.format(s=r["subject"]) not in asked[r["subject"]]]
        del asked[r["subject"]]
        if others:
            out.append(dict(r, prompt=rng.choice(others)))
    return out


def own_answer_pairs(pairs: Sequence[dict], answers: Sequence[dict]) -> list[dict]:
    """Pairs whose rejected answer is the model's own: for each scored answer of a model (the `teaching` eval's
    samples: prompt, output, passes, on_topic) that fails the rubric, the record asked with that prompt gives the
    chosen answer and the model's output becomes the rejected one (kind "own"). Preference optimisation then
    pushes away from what the model actually writes (its invented names, broken calls, wrong outputs), which
    pairs made from perturbed references do not show it (on-policy rejected answers, as in iterative DPO)."""
    by_prompt = {r["prompt"]: r for r in pairs}
    out = []
    for a in answers:
        r = by_prompt.get(a.get("prompt"))
        if r is None or not isinstance(a.get("output"), str):
            continue
        if a.get("passes") and a.get("on_topic", True):
            continue  # the model's answer is already a good one
        if a["output"].strip() == r["chosen"].strip() or not a["output"].strip():
            continue
        out.append({"prompt": r["prompt"], "chosen": r["chosen"], "rejected": a["output"], "kind": "own",
                    "subject": r.get("subject"), "source": r.get("source")})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data_pipelines.preferences", description=__doc__.split("\n")[0])
    p.add_argument("--source", default=None, help="the source tree (default: the Python standard library)")
    p.add_argument("--out", required=True, help="folder for train.jsonl and val.jsonl")
    p.add_argument("--val-fraction", type=float, default=0.1, help="share of the records held out, by file")
    p.add_argument("--max", type=int, default=None, help="keep at most N pairs (a seeded sample)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--wrong-fraction", type=float, default=0.5, help="share of rejected answers that are wrong")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per example run")
    p.add_argument("--workers", type=int, default=2, help="sandbox processes")
    p.add_argument("--pairs-per-subject", type=int, default=1,
                   help=f"records per subject, each in its own phrasing of the question (1 to {len(PROMPTS)})")
    p.add_argument("--demonstrations", type=int, default=0, metavar="K",
                   help="each training subject's first K records become SFT demonstrations (sft.jsonl: prompt -> "
                        "chosen answer), its others stay pairs in train.jsonl; rephrased.jsonl asks each training "
                        "subject in a phrasing none of its records uses (--pairs-per-subject must leave one free)")
    p.add_argument("--own-answers", metavar="SAMPLES", default=None,
                   help="instead of mining: a teaching eval's samples/teaching.jsonl of a model answering the prompts "
                        "of --pairs; writes OUT/train.jsonl = those pairs + one pair per failing answer, whose "
                        "rejected answer is the model's own (own_answer_pairs)")
    p.add_argument("--pairs", default=None, help="with --own-answers: the pairs file the model was asked from")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    if args.own_answers:
        if not args.pairs:
            p.error("--own-answers needs --pairs FILE (the records whose prompts the model answered)")
        from data_pipelines.mix import read_records

        try:
            pairs, answers = read_records(args.pairs), read_records(args.own_answers)
        except DataError as e:
            p.error(str(e))
        own = own_answer_pairs(pairs, answers)
        records = pairs + own
        random.Random(args.seed).shuffle(records)
        write_jsonl(Path(args.out) / "train.jsonl", records)
        print(f"{len(pairs)} pairs + {len(own)} with the model's own failing answer as the rejected one "
              f"({len(answers) - len(own)} answers passed or were unusable) -> {Path(args.out) / 'train.jsonl'}")
        return 0
    stats: dict = {}
    try:
        records = make_pairs(args.source, seed=args.seed, max_pairs=args.max, wrong_fraction=args.wrong_fraction,
                             timeout=args.timeout, workers=args.workers, stats=stats,
                             pairs_per_subject=args.pairs_per_subject)
        train, val, dropped = split_by_file(records, args.val_fraction)
        everything = train
        demos, train = demonstrations(train, args.demonstrations) if args.demonstrations else ([], train)
    except DataError as e:
        p.error(str(e))
    out = Path(args.out)
    splits = {"train": train, "val": val}
    if args.demonstrations:
        splits.update(sft=demos, rephrased=rephrased(everything, args.seed))
    for name, split in splits.items():
        write_jsonl(out / f"{name}.jsonl", split)
    print(", ".join(f"{k} {v}" for k, v in sorted(stats.items()) if not k.startswith("kind_")))
    print(count_table({"train": train, "val": val}, KINDS))
    if args.demonstrations:
        print(f"{len(demos)} SFT demonstrations ({args.demonstrations} per training subject) -> {out / 'sft.jsonl'}; "
              f"{len(splits['rephrased'])} training subjects asked anew -> {out / 'rephrased.jsonl'}")
    if dropped:
        print(f"{dropped} val records dropped: their prompt is also a train prompt")
    print(f"-> {out / 'train.jsonl'}, {out / 'val.jsonl'} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
