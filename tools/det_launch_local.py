#!/usr/bin/env python3
"""Determined's own multi-process launcher (`determined.launch.torch_distributed`) on this machine, without a
cluster: what a trial's processes see on a cluster (RANK, LOCAL_WORLD_SIZE, the chief's address) they see here
too, while `det.get_cluster_info()` stays None in them, so each runs off-cluster (Determined's dummy context,
checkpoints under <output_dir>/checkpoints/).

    python tools/det_launch_local.py SLOTS -- python3 entrypoint.py --config experiments/local-tiny.yaml ...

The launcher refuses to start without cluster information, so this gives it a stand-in for one task of SLOTS
slots on this host; nothing is contacted (python3 must be on PATH, as in a task container).
"""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) < 3 or not argv[0].isdigit() or argv[1] != "--":
        print("usage: det_launch_local.py SLOTS -- python3 entrypoint.py ARGS...", file=sys.stderr)
        return 2
    from determined import _info
    from determined.launch import torch_distributed

    slots, command = int(argv[0]), argv[2:]
    _info._info = _info.ClusterInfo(  # read by the launcher only; its workers find no cluster
        master_url="http://127.0.0.1:1",
        cluster_id="local",
        agent_id="local",
        slot_ids=list(range(slots)),
        task_id="local-task",
        allocation_id="local-allocation",
        session_token="",
        task_type="COMMAND",
    )
    override, script = torch_distributed.parse_args(command)
    return torch_distributed.main(override, script)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
