"""Runs the llmquant CLI with a kill switch on the layer sink, for the kill/resume tests.

    python tests/kill_switch.py exit|pause LAYER ARGS...

After layer LAYER is checkpointed, `exit` ends the process at once with os._exit(137) (no cleanup,
as a SIGKILL or an OOM kill would), and `pause` prints a marker to stderr and sleeps, so that the
test can SIGKILL it at a known point. The product has no such switch: the test wraps the sink.
"""

import os
import sys
import time

import torch

from llmquant import resume
from llmquant.cli import main


def install(mode: str, layer: int) -> None:
    save_layer = resume.WorkDir.save_layer

    def save_then_stop(self, report, records, next_inputs):
        save_layer(self, report, records, next_inputs)
        if report.index != layer:
            return
        if mode == "exit":
            os._exit(137)
        sys.stderr.write(f"kill switch: paused after layer {layer}\n")
        sys.stderr.flush()
        time.sleep(600)

    resume.WorkDir.save_layer = save_then_stop


if __name__ == "__main__":
    torch.set_num_threads(1)
    install(sys.argv[1], int(sys.argv[2]))
    sys.argv = ["llmquant", *sys.argv[3:]]
    main()
