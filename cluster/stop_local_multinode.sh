#!/usr/bin/env bash
# Stop exactly the nodes cluster/local_multinode.sh started in $RLHF_LOCAL_DIR (default
# /tmp/rlhf_ray_local): their `ray start` process groups by pid, then any process left whose
# command line names that temp dir. Nothing else on the machine is touched.
exec "$(dirname "${BASH_SOURCE[0]}")/local_multinode.sh" stop
