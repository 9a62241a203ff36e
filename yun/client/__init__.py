"""The Python SDK of the Yun REST API, typed with the API's own models.

Blocking::

    from yun.client import Client, KeyPairAuth
    from yun.proto.resources import VmCreate

    client, token = Client.login("http://gateway:8080", "alice", "secret", project="web")
    with client:
        task = client.vms.create(VmCreate(name="web1", image="debian"), wait=True)
        for vm in client.vms.iterate(q="state=running", sort="name"):
            print(vm.name, vm.ip)

Asynchronous, the same namespaces awaited::

    async with AsyncClient(url, KeyPairAuth(access_key, secret)) as client:
        vm = await client.vms.get("web1")
        async for image in client.images.iterate():
            ...

Errors are :class:`ApiError` (``status`` 0: the gateway could not be reached);
waiting for a task that fails raises :class:`TaskFailed`.
"""

from yun.client._base import DEFAULT_WAIT, Wait
from yun.client.auth import KeyPairAuth, TokenAuth
from yun.client.client import AsyncClient, Client, gateway_url
from yun.client.errors import (
    ApiError,
    ClientError,
    InvalidReference,
    TaskFailed,
    TaskTimeout,
)

__all__ = [
    "DEFAULT_WAIT", "ApiError", "AsyncClient", "Client", "ClientError", "InvalidReference",
    "KeyPairAuth",
    "TaskFailed", "TaskTimeout", "TokenAuth", "Wait", "gateway_url",
]
