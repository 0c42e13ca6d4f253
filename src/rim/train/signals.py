"""SIGTERM and SIGINT during training: noted, agreed on by every process, acted on at the next step boundary (a
checkpoint, then ``rim.errors.Interrupted``)."""

from __future__ import annotations

import signal

import torch


class StopSignals:
    """While active, SIGTERM and SIGINT only set ``signum``; the loop checkpoints and stops at the next step."""

    def __init__(self):
        self.signum, self.previous, self.group = 0, {}, None

    def __enter__(self) -> StopSignals:
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def agreed(self, accelerator) -> int:
        """The signal seen by any process (0 if none): every process stops at the same step. The flag is host
        state, so it is reduced over a gloo group on the host: a reduction on the GPU would make the host wait for
        the step's kernels every step."""
        if accelerator.num_processes == 1:
            return self.signum
        import torch.distributed as dist

        if self.group is None:  # collective: every process gets here at its first step
            self.group = dist.new_group(backend="gloo")
        flag = torch.tensor(self.signum)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return int(flag)

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        if self.group is not None:  # one per training run: several runs in one process (rim compare) add none
            import torch.distributed as dist

            dist.destroy_process_group(self.group)
