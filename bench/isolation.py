"""One benchmark job in a process of its own, so that a hang or a memory blow-up costs its
row only (bench/vs_torch_pruning.py runs each tool on each model this way)."""
import multiprocessing
import resource
from typing import Callable


def isolated(job: Callable[[], dict], seconds: float, memory_gb: float) -> dict:
    """job()'s row, computed in a forked child process held to `seconds` and `memory_gb` of
    address space, or (the child killed or dead) a row naming why there is none."""
    context = multiprocessing.get_context("fork")
    receiver, sender = context.Pipe(duplex=False)

    def child() -> None:
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        sender.send(job())

    process = context.Process(target=child)
    process.start()
    sender.close()
    try:
        if not receiver.poll(seconds):
            process.kill()
            return dict(error=f"timed out: no result after {seconds:.0f} s")
        return receiver.recv()
    except EOFError:  # the child died without a row (killed for memory, a crash)
        process.join()
        return dict(error=f"the process died (exit code {process.exitcode})")
    finally:
        process.join()
