"""The listening socket of `siglip serve`: connections accepted from it send without Nagle's
delay. Without TCP_NODELAY every request after the first on a kept-alive connection waited for
the client's delayed ACK (~40 ms on Linux: /v1/health took 44 ms instead of 2)."""

from __future__ import annotations

import asyncio
import socket

from siglip_cli.cli.serve import _bind


def _nodelay_of_accepted(host: str) -> int:
    async def main() -> int:
        listening = _bind(host, 0)
        seen: asyncio.Future = asyncio.get_running_loop().create_future()

        class Probe(asyncio.Protocol):
            def connection_made(self, transport):
                accepted = transport.get_extra_info("socket")
                seen.set_result(accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
                transport.close()

        server = await asyncio.get_running_loop().create_server(Probe, sock=listening)  # as uvicorn does with our socket
        port = listening.getsockname()[1]
        _, writer = await asyncio.open_connection(host, port)
        try:
            return await asyncio.wait_for(seen, 10)
        finally:
            writer.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


def test_accepted_connections_have_tcp_nodelay():
    assert _bind("127.0.0.1", 0).proto == socket.IPPROTO_TCP
    assert _nodelay_of_accepted("127.0.0.1") != 0
