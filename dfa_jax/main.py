"""Command line entry: flags -> locked config -> `pipeline.run(config, workdir)`.

Kept short on purpose; everything testable lives in the library.

  python -m dfa_jax.main --config=configs/demo.py --workdir=runs/demo
  python -m dfa_jax.main --config=configs/cifar100_teacher.py:tiny --workdir=/tmp/t \
      --config.teacher.optim.epochs=1
  # Several processes (one per host or GPU) run the same command with --distributed, or with
  # --coordinator_address/--num_processes/--process_id (launch/local.sh --processes N does this).
"""

import errno
import os
import re
import signal
import sys
import traceback

# TensorFlow is only tf.data for TFDS datasets not prepared as array_record (data/sources.py).
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import logging as std_logging  # noqa: E402

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
from absl import logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg])."
)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Run directory; re-running the same command resumes."
)
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed",
    False,
    "Join a multi-process run whose set-up JAX detects (TPU pod VMs, SLURM srun tasks, Open MPI).",
)
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "HOST:PORT of process 0 for an explicit multi-process run."
)
_NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in an explicit multi-process run."
)
_PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index in [0, num_processes)."
)
_ALLOW_CPU = flags.DEFINE_bool(
    "allow_cpu",
    False,
    "Train on the CPU even though the machine has a GPU or TPU that JAX does not use.",
)
flags.mark_flags_as_required(["config", "workdir"])
# `--config.X=None` overrides, set after the config loads: the flag parser would read the word
# as a string (or fail on a number field); `config_lib.validate` says where None is allowed.
_NONE_OVERRIDES: list[str] = []


def _explicit_processes() -> bool:
    """Whether the explicit multi-process flags are given (all three or none)."""
    given = [f is not None for f in (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)]
    if any(given) and not all(given):
        raise app.UsageError(
            "--coordinator_address, --num_processes and --process_id go together"
            " (launch/local.sh --processes N sets all three)"
        )
    if all(given) and not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
        raise app.UsageError(
            f"--process_id={_PROCESS_ID.value} must lie in [0, --num_processes={_NUM_PROCESSES.value})"
        )
    return all(given)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
        config = _CONFIG.value
        config.lock()  # Also the first attribute access: a config file that failed to load raises.
    except OSError as e:  # The config file could not be loaded; config_flags says which.
        sys.exit(f"error: {_explain(e)}")
    _set_none_overrides(config)
    # The progress log is the project's: other libraries (orbax narrates every save, JAX lists
    # the backends it did not find) show their warnings and errors only.
    package_dir = os.path.dirname(os.path.abspath(__file__)) + os.sep
    logging.get_absl_handler().addFilter(
        lambda record: (
            record.pathname.startswith(package_dir) or record.levelno >= std_logging.WARNING
        )
    )
    from dfa_jax import config_lib  # pylint: disable=g-import-not-at-top

    # Before JAX starts: it would first make every device asked for.
    cpu_problems = config_lib.cpu_device_problems(config)
    if cpu_problems:
        sys.exit(f"error: invalid config:\n  - {cpu_problems[0]}")
    import jax  # pylint: disable=g-import-not-at-top

    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top

    if config.keep_freed_host_memory:
        parallel.keep_freed_host_memory()  # Before JAX starts its threads.
    parallel.use_compilation_cache(config.compilation_cache_dir)
    if _explicit_processes():
        parallel.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
    elif _DISTRIBUTED.value:
        parallel.initialize_distributed()
    # After joining (the count fits the batches over all processes), before any backend starts.
    cpu_devices_note = parallel.configure_cpu_devices(
        config.num_cpu_devices, parallel.global_batch_sizes(config), parallel.joined_processes()
    )
    from dfa_jax import errors, pipeline, preemption  # pylint: disable=g-import-not-at-top

    preemption.install()  # SIGTERM / Ctrl-C: checkpoint after the current step, then exit.
    try:
        parallel.check_accelerators_used(_ALLOW_CPU.value)
        if cpu_devices_note and jax.default_backend() == "cpu":
            logging.info("%s", cpu_devices_note)
        pipeline.run(config, _WORKDIR.value, config_path=flags.FLAGS["config"].config_filename)
        if preemption.pending():
            # It came during the last step or the records after it: there is nothing to stop.
            print(
                f"{preemption.pending()} came as the run finished: it is complete (status 0),"
                " nothing to resume.",
                file=sys.stderr,
                flush=True,
            )
    except errors.InputError as e:
        # A user's mistake, already explained: the message, not a traceback.
        _exit_now_if_several_processes(f"error: {e}")
        sys.exit(f"error: {e}")
    except preemption.Stopped as e:
        print(f"{e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:  # A second Ctrl-C: out at once, with the shell's status for it.
        print(
            "interrupted; run the same command again to resume from the last checkpoint.",
            file=sys.stderr,
            flush=True,
        )
        sys.exit(128 + signal.SIGINT)
    except Exception as e:  # pylint: disable=broad-except
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
            # The disk filled during the run (checkpoints say so themselves; a record may meet
            # it first): what to do, not a traceback. Nothing finished is lost.
            where = f" writing {e.filename}" if e.filename else ""
            message = (
                f"error: the disk is full ({e.strerror}{where}); free space, then run the same"
                " command again: it resumes from the last checkpoint."
            )
            _exit_now_if_several_processes(message)
            sys.exit(message)
        _exit_now_if_several_processes(traceback.format_exc().rstrip())
        raise


def _exit_now_if_several_processes(message: str) -> None:
    """With several processes, prints `message` and leaves at once (status 1): JAX's exit-time
    shutdown would wait minutes for the other processes, which wait for this one in the step's
    collectives, with no word on the console; leaving makes theirs fail at once."""
    from dfa_jax import parallel  # pylint: disable=g-import-not-at-top

    # Asked without starting a backend: the error may be that one failed to start
    # (`jax.process_count()` would start it, and raise again here).
    if parallel.joined_processes() > 1:
        print(message, file=sys.stderr, flush=True)
        sys.stdout.flush()
        os._exit(1)  # pylint: disable=protected-access


def _set_none_overrides(config) -> None:
    """Sets each `--config.X=None` field to None (an unknown field is an `error:` line)."""
    for path in _NONE_OVERRIDES:
        *parents, leaf = path.split(".")
        node = config
        try:
            for name in parents:
                node = node[name]
            if leaf not in node:
                raise KeyError(leaf)
        except (KeyError, TypeError):
            sys.exit(f"error: unknown config field config.{path} (in --config.{path}=None)")
        with node.unlocked():
            node[leaf] = None


def _without_none_overrides(argv: list[str]) -> list[str]:
    """`argv` less its `--config.X=None` arguments, whose fields go to `_NONE_OVERRIDES`."""
    kept = []
    for arg in argv:
        none = re.fullmatch(r"--config\.([\w.]+)=None", arg)
        if none:
            _NONE_OVERRIDES.append(none.group(1))
        else:
            kept.append(arg)
    return kept


def _repeated_config_fields(argv: list[str]) -> list[str]:
    """The `--config.X` fields given more than once (the parser would merge tuples given twice,
    `(0,1)` then `(2,)` into `(0,1,2)`, and keep the last of anything else)."""
    names = [
        m.group(1) for arg in argv if (m := re.match(r"--config\.([\w.]+)(=|$)", arg)) is not None
    ]
    return sorted({n for n in names if names.count(n) > 1})


def _explain(error: BaseException) -> str:
    """The user-facing part of an error raised while reading flags or the config file.

    config_flags embeds the loader's traceback in its messages: keep the last line(s) that say
    what went wrong, without the exception's class path.
    """
    text = str(error).strip()
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":
        text = text[1:-1]  # KeyError/AttributeError quote their message.
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        lines = lines[-1:]
    text = " ".join(lines).replace("\\'", "'").replace("\\n", " ")
    return re.sub(r"^[\w.]*(Error|Exception): ", "", text)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a config mistake found while parsing (an unknown field, a bad
    value or `:arg`) reported as one `error:` line instead of a traceback, a field given twice
    refused, and `--config.X=None` setting None."""
    repeated = _repeated_config_fields(argv)
    if repeated:
        sys.exit(
            "error: " + ", ".join(f"--config.{n}" for n in repeated) + " given more than once;"
            " give each field once."
        )
    argv = _without_none_overrides(argv)
    sys.argv[:] = argv  # config_flags finds its overrides in sys.argv, not in what it is given.
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        sys.exit(f"error: {_explain(e)}\nPass --help for the flags.")
    except AttributeError as e:  # config_flags: `--config.no.such.field=...`.
        sys.exit(f"error: unknown config field {_explain(e)}")
    except (KeyError, OSError, ValueError, TypeError) as e:
        sys.exit(f"error: {_explain(e)}")


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
