"""The pipeline a run goes through: teacher -> search -> distill -> report.

Each stage lives in its own directory of the workdir, resumes from its checkpoints and is skipped
once its `result.json` exists, so re-running the same command continues an interrupted run.
`run(config, workdir)` is what `main.py` and the tests call.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from dfa_jax import config_lib
from dfa_jax import distill
from dfa_jax import errors
from dfa_jax import files
from dfa_jax import inputs
from dfa_jax import parallel
from dfa_jax import reporting
from dfa_jax import search
from dfa_jax import teacher
from dfa_jax import train_loop
from dfa_jax import workdir as workdir_lib


def run(config, workdir: str, config_path: str | None = None) -> dict:
    """Runs the configured stages in `workdir` and returns (and writes) the run's summary; a
    workdir another run is using is refused (`workdir.locked`)."""
    try:
        config_lib.validate(config)
    except errors.ConfigError as e:
        # A batch size the device count does not divide: say where that count came from.
        hint = parallel.device_count_hint(
            config.num_cpu_devices, parallel.global_batch_sizes(config)
        )
        if not hint or not any(field in str(e) for field in parallel.BATCH_SIZE_FIELDS):
            raise
        raise errors.ConfigError(f"{e}\n  - {hint}") from None
    for line in config_lib.schedule_warnings(config) + config_lib.teacher_data_warnings(config):
        logging.warning("%s", line)
    # Every step, evaluation and helper the run traces computes at the asked precision.
    with workdir_lib.locked(workdir), parallel.matmul_precision(config.matmul_precision):
        return _run(config, workdir, config_path)


def _run(config, workdir: str, config_path: str | None) -> dict:
    workdir_lib.prepare(config, workdir)
    if "distill" in config.stages:  # Before any stage: it may refuse the seeds asked for.
        distill.prepare_seed_layout(config, workdir)
    mesh = parallel.make_mesh()
    logging.info(
        "mesh: %d %s devices over %d process(es)",
        mesh.size,
        mesh.devices.flat[0].platform,
        jax.process_count(),
    )

    data = inputs.load(config, workdir, search="search" in config.stages)
    inputs.check_batch_sizes(config, data)
    stages: dict[str, dict] = {}
    # Search and distillation need a teacher: the teacher stage trains it or loads it.
    teacher_result, teacher_vars = teacher.run(config, workdir, mesh, data)
    stages["teacher"] = teacher_result
    if "search" in config.stages:
        stages["search"] = search.run(config, workdir, mesh, data, teacher_vars)
    if "distill" in config.stages:
        stages.update(distill.run_all(config, workdir, mesh, data, teacher_vars))
    stages.update(_finished_before(workdir, stages))

    summary = {
        "workdir": files.absolute(workdir),
        "config_path": config_path,
        "config_hash": workdir_lib.config_hash(config.to_dict()),
        "seed": config.seed,
        "dataset": config.data.dataset,
        "teacher_model": config.teacher.model,
        "student_model": config.student.model,
        "stages": stages,
        "tensorboard": f"tensorboard --logdir {files.absolute(workdir)}",
    }
    path = reporting.write_summary(workdir, summary)
    if jax.process_index() == 0:  # One report per run, not one per process.
        print(reporting.results_table(stages))
        if "search" in stages:
            record = search.alpha_record_from_file(os.path.join(workdir, search.ALPHA_FILE))
            print("searched alpha:\n" + reporting.alpha_table(record))
        print(
            f"summary: {files.absolute(path)}\nTensorBoard logs: {files.absolute(workdir)}"
            f" (view with `tensorboard --logdir {files.absolute(workdir)}`)"
        )
    return summary


def _finished_before(workdir: str, stages: dict) -> dict:
    """The stages and students an earlier command of this workdir finished that this one did
    not run (fewer stages, other students), named by its summary.json, with the result each
    has on disk now (none: left out): the summary stays the whole run's."""
    path = os.path.join(workdir, reporting.SUMMARY_FILE)
    try:
        earlier = files.read_json(path)["stages"] if files.exists(path) else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}  # An unreadable summary is rewritten whole below.
    if not isinstance(earlier, dict):
        return {}

    def result(name: str) -> dict:
        directory = os.path.join(workdir, name)
        found = train_loop.read_result(directory)
        if not name.startswith("distill/"):
            return found
        # With its student's seed, as `distill.run_all` gives it: the one-seed layout's name
        # does not say it, and the report pairs students by it. None (no record, or one that
        # cannot be read): the report takes the run's seed.
        try:
            seed = distill.recorded_seed(directory)
        except (OSError, ValueError, KeyError, TypeError):
            seed = None
        return found if seed is None else {**found, "seed": seed}

    return {
        name: result(name)
        for name in earlier
        if name not in stages and train_loop.is_done(os.path.join(workdir, name))
    }
