"""Create a VM, move it to another node, list VMs: through a client that
openapi-python-client generated from the served document (the package
`ferry_client`, on PYTHONPATH), the way a control plane embedding Ferry would.

Usage: client_flow.py BASE_URL TOKEN
"""

import sys
import time

from ferry_client import AuthenticatedClient
from ferry_client.api.nodes import list_nodes
from ferry_client.api.migrations import get_migration
from ferry_client.api.vms import create_vm, get_vm, list_vms, move_vm
from ferry_client.models import CreateVm, Migration, MoveStarted, MoveVm, Vm


def main() -> None:
    base, token, ca = sys.argv[1], sys.argv[2], sys.argv[3]
    # verify_ssl: the cluster CA's certificate, the only one trusted.
    client = AuthenticatedClient(
        base_url=base, token=token, verify_ssl=ca, raise_on_unexpected_status=True
    )

    nodes = list_nodes.sync(client=client)
    assert isinstance(nodes, list) and len(nodes) == 3, nodes
    first = next(n for n in nodes if n.id == 1)

    vm = create_vm.sync(client=client, body=CreateVm(name="client-1", memory_mib=16, node=first.name))
    assert isinstance(vm, Vm), vm
    assert vm.state == "running" and vm.owner == first.id, vm
    print(f"created {vm.name} on {vm.owner_name}")

    target = next(n for n in nodes if n.id != vm.owner)
    started = move_vm.sync(vm=vm.name, client=client, body=MoveVm(target=target.name))
    assert isinstance(started, MoveStarted), started
    assert started.target == target.id, started
    print(f"moving {vm.name} to {started.target_name} (migration {started.migration})")

    # Poll with a deadline: the move runs on the source and ends on its own.
    deadline = time.monotonic() + 60
    while True:
        m = get_migration.sync(id=started.migration, client=client)
        if isinstance(m, Migration) and m.outcome != "active":
            break
        if time.monotonic() > deadline:
            sys.exit(f"migration {started.migration} still active after 60 s: {m}")
        time.sleep(0.2)
    assert isinstance(m, Migration) and m.outcome == "completed", m

    vms = list_vms.sync(client=client)
    assert isinstance(vms, list), vms
    moved = next(v for v in vms if v.name == vm.name)
    assert moved.owner == target.id and moved.state == "running", moved
    again = get_vm.sync(vm=vm.name, client=client)
    assert isinstance(again, Vm) and again.owner == target.id, again
    print(f"listed: {moved.name} runs on {moved.owner_name} (epoch {moved.epoch})")
    print("generated client: create, move, list: ok")


if __name__ == "__main__":
    main()
