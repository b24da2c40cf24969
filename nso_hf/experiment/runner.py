"""Run the planned runs: each one a run of the task's script (`finetune_cot.py`, `pretrain_clip.py`), in its own process.

A run is the script's own code path (`nso_hf.experiment.tasks`) with its options as command-line
tokens, so a comparison measures exactly what a user runs. Each run gets a fresh worker process (one run
per process, forked from a server that has imported the task's modules: `worker_context`): its peak
memory is its own, one thread per process keeps two workers on two cores from slowing each other, and a
crash costs that run only. A finished run leaves its results file (`cot_results.json`,
`eval_results.json`) in its folder and is not run again: an interrupted comparison resumes.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import sys
import time
from collections.abc import Sequence
from typing import Any

from nso_hf.experiment.plan import STRENGTH_NAME, Run
from nso_hf.experiment.tasks import TASKS, Task


def run_tokens(run: Run, base_argv: Sequence[str], output_root: str, eval_sources: Sequence[str], flatness: Sequence[str]) -> list[str]:
    """The command line of `run`: the shared options, then the run's own (which win)."""
    arm = run.arm
    tokens = list(base_argv) + [
        "--method", arm.method, *arm.options(), "--seed", str(run.seed), "--max_steps", str(run.steps),
        "--output_dir", os.path.join(output_root, run.name), "--eval_sources", *eval_sources,
        "--save_final_model", "false", "--save_strategy", "no", "--disable_tqdm", "true",
    ]
    if run.strength is not None:
        tokens += [f"--{STRENGTH_NAME[arm.method]}", repr(run.strength)]
    if run.role == "test":
        tokens += list(flatness)
    return tokens + checkpoint_tokens(tokens)


def _last_value(tokens: Sequence[str], option: str) -> str | None:
    """The value of the last `option value` pair in `tokens` (argparse keeps the last), or None."""
    at = [i for i, t in enumerate(tokens[:-1]) if t == option]
    return tokens[at[-1] + 1] if at else None


def checkpoint_tokens(tokens: Sequence[str]) -> list[str]:
    """The saves a run that ends on its best checkpoint needs, in place of the forced `--save_strategy no`.

    A checkpoint is saved only when the validation score improves (`--save_strategy best`), weights only
    (`--save_only_model`: no optimizer state, a tenth of the bytes for Adam), and only the newest is kept
    (`--save_total_limit 1`): at most one best checkpoint per running run, in the run's own folder.
    `remove_checkpoints` deletes it once the run's results are written (its numbers are in them), and before a
    run starts (an interrupted run starts again from step 0: weights-only checkpoints cannot resume training).

    Returns:
        [] unless `tokens` ask for `--load_best_model_at_end true`.
    """
    if str(_last_value(tokens, "--load_best_model_at_end")).lower() != "true":
        return []
    return ["--save_strategy", "best", "--save_total_limit", "1", "--save_only_model", "true"]


def record_memory(results: dict[str, Any], tokens: list[str], own_process: bool, task: Task) -> None:
    """Add the run's peak memory and command line to its results: the two keys a finished run has.

    The peak is the main process's CUDA allocation in training, which both scripts record; on CPU,
    when the run had its process to itself, that process's peak resident set; otherwise none.
    """
    cuda = task.train_numbers(results)[2]
    if cuda is not None:
        memory, kind = cuda, "cuda_max_memory_allocated (main process, training)"
    elif own_process:
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
        memory, kind = rss / (2**20 if sys.platform == "darwin" else 2**10), "process_peak_rss"
    else:
        memory, kind = None, "not measured: runs shared one process, or a launcher ran it on CPU"
    results["peak_memory_mib"], results["peak_memory_kind"] = memory, kind
    results["command_line"] = list(tokens)  # what a resumed comparison checks before reusing the run


def execute(
    tokens: list[str], own_process: bool = True, log_file: str | None = None, task_name: str = "cot", script: str | None = None
) -> dict[str, Any]:
    """Run the task's script code on `tokens`; returns its results with the peak memory added.

    Args:
        tokens: the command line.
        own_process: the caller runs this in a fresh process, so the process's peak memory is the run's.
        log_file: send this process's output there (file descriptors 1 and 2: library output included).
        task_name: a key of `TASKS` (a name, so a worker process can receive it).
        script: the task's script path (the clip task runs its parse and main).
    """
    if log_file is not None:
        os.makedirs(os.path.dirname(log_file), exist_ok=True)
        fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
    import torch
    from transformers import TrainingArguments

    torch.set_num_threads(1)  # see the module docstring; the CoT demo measured 1 thread faster on 2 busy cores
    task = TASKS[task_name]
    arguments = task.parse(tokens, script)
    output_dir = next(a for a in arguments if isinstance(a, TrainingArguments)).output_dir
    remove_checkpoints(output_dir, tokens)  # left by an interrupted attempt
    start = time.perf_counter()
    results = task.run(arguments)
    results["wall_seconds"] = time.perf_counter() - start
    record_memory(results, tokens, own_process, task)
    with open(os.path.join(output_dir, task.results_file), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)  # rewritten with the memory: its presence marks the run done
    remove_checkpoints(output_dir, tokens)
    return results


def remove_checkpoints(folder: str, tokens: Sequence[str]) -> None:
    """Delete the `checkpoint-N` folders of a run that `checkpoint_tokens` has save them (a no-op otherwise).

    A comparison of 80 runs would otherwise keep 80 best checkpoints.
    """
    if checkpoint_tokens(tokens) and os.path.isdir(folder):
        for name in os.listdir(folder):
            if name.startswith("checkpoint-"):
                shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def load_done(folder: str, tokens: list[str], results_file: str = TASKS["cot"].results_file) -> dict[str, Any] | None:
    """The results of the run of `tokens` finished in `folder`, or None when it has not finished.

    Raises:
        ValueError: `folder` holds a finished run made with other options (another task, another
            config): reusing it would mix two experiments in one table.
    """
    path = os.path.join(folder, results_file)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    if "peak_memory_kind" not in results:  # written last by execute / launch: the run did not finish
        return None
    if results.get("command_line") != list(tokens):
        raise ValueError(
            f"{folder} holds a run made with other options than this comparison's: use another --output_dir, "
            "or delete the folder to run it again."
        )
    return results


def launch(tokens: list[str], launcher: str, script: str, log_file: str, task: Task = TASKS["cot"]) -> dict[str, Any]:
    """Run the task's script as `<launcher> <script> <tokens>` (e.g. `accelerate launch --num_processes 4`).

    The peak memory is the main process's peak CUDA allocation in training (the script records it);
    on CPU there is none.

    Raises:
        RuntimeError: the launch failed (its log is named).
    """
    import shlex
    import subprocess

    os.makedirs(os.path.dirname(log_file), exist_ok=True)
    remove_checkpoints(os.path.dirname(log_file), tokens)  # left by an interrupted attempt
    with open(log_file, "w", encoding="utf-8") as log:
        done = subprocess.run([*shlex.split(launcher), script, *tokens], stdout=log, stderr=subprocess.STDOUT)
    folder = os.path.dirname(log_file)
    path = os.path.join(folder, task.results_file)
    if done.returncode != 0 or not os.path.exists(path):
        raise RuntimeError(f"{launcher} {script} failed (exit {done.returncode}); its output: {log_file}")
    with open(path, encoding="utf-8") as handle:
        results = json.load(handle)
    record_memory(results, tokens, False, task)  # the launcher's processes are not this one
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=2)
    remove_checkpoints(folder, tokens)
    return results


def worker_context(task: Task) -> Any:
    """The multiprocessing context of the worker processes: each forked from a server that imported `task.modules`.

    A spawned worker imports torch, transformers and the task's code before its run starts: with one run per
    worker, that is paid by every run (several seconds of each minute-long run of the embedded task on 2
    cores). The fork server imports them once; each worker is still a fresh process, forked before anything
    has run (no thread pool started, no CUDA context), as DataLoader workers are forked after `import torch`.
    Where there is no fork server (Windows), workers are spawned.
    """
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Read when the server starts (the first pool of this process); a failed import is skipped by the server.
    context.set_forkserver_preload(["torch", "transformers", __name__, *task.modules])
    return context


def costliest_first(jobs: Sequence[tuple[Run, list[str]]]) -> list[tuple[Run, list[str]]]:
    """`jobs` ordered by their forward+backward passes, most first; jobs of equal passes keep their order.

    Why: a pool takes the jobs in order, so a costly run submitted last runs alone while the other workers
    idle. Longest first cuts that tail: `make demo`'s three NSO runs (two passes a step) before its three
    plain ones. Only the order of execution changes; every run is its own process and gives the same numbers.
    """
    return sorted(jobs, key=lambda job: -job[0].arm.passes(job[0].steps))


def run_all(
    jobs: list[tuple[Run, list[str]]], output_root: str, workers: int, launcher: str | None = None,
    script: str | None = None, task: Task = TASKS["cot"],
) -> dict[str, dict[str, Any]]:
    """Run every (run, tokens) not already finished; returns {run name: results}.

    Args:
        jobs: the runs and their command lines.
        output_root: where the run folders are.
        workers: parallel worker processes; 0 runs everything in this process (no memory figure).
        launcher: run each run, one after another, as `<launcher> <script> <tokens>` instead (e.g.
            `accelerate launch --num_processes 8` for multi-GPU runs); `workers` is then ignored.
        script: the task's script path (for `launcher`, and the clip task's in-process runs).
        task: what the runs are.
    """
    results: dict[str, dict[str, Any]] = {}
    todo = []
    for run, tokens in jobs:
        done = load_done(os.path.join(output_root, run.name), tokens, task.results_file)
        if done is not None:
            results[run.name] = done
        else:
            todo.append((run, tokens))
    if todo:
        print(f"[compare] {len(todo)} runs to do, {len(results)} already done", flush=True)
    if launcher is not None:
        if script is None:
            raise ValueError(f"run_all: a launcher needs the path of {task.script} (script).")
        for i, (run, tokens) in enumerate(todo):
            print(f"[compare] {i + 1}/{len(todo)} {launcher} ... {run.name}", flush=True)
            results[run.name] = launch(tokens, launcher, script, os.path.join(output_root, run.name, "log.txt"), task)
        return results
    if workers == 0:
        for i, (run, tokens) in enumerate(todo):
            print(f"[compare] {i + 1}/{len(todo)} {run.name}", flush=True)
            results[run.name] = execute(tokens, False, None, task.name, script)
        return results
    context = worker_context(task)
    with context.Pool(workers, maxtasksperchild=1) as pool:
        pending = {
            run.name: pool.apply_async(execute, (tokens, True, os.path.join(output_root, run.name, "log.txt"), task.name, script))
            for run, tokens in costliest_first(todo)
        }
        for i, (name, handle) in enumerate(pending.items()):
            results[name] = handle.get()
            print(f"[compare] {i + 1}/{len(todo)} done: {name} ({results[name]['wall_seconds']:.0f} s)", flush=True)
    return results
