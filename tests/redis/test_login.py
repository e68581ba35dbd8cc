"""Logging in to Redis: an ACL user and password in the URL, and TLS (rediss://)."""

from __future__ import annotations

from contextlib import AsyncExitStack
from pathlib import Path

import trio
import trustme

from server.test_subprocess import child_env, relay_process

from .conftest import client, http, readyz, redis_server, wait_ready


async def _not_ready_because(node, words: str) -> str:  # type: ignore[no-untyped-def]
    """Wait until the node's /readyz answers 503 naming ``words``; return the body."""
    with trio.fail_after(10):
        while True:
            status, body = await readyz(node)
            if status == 503 and words in body:
                return body
            assert status == 503, body
            await trio.sleep(0.05)


async def _node(stack: AsyncExitStack, workdir: Path, url: str, **env: str):  # type: ignore[no-untyped-def]
    node = await stack.enter_async_context(
        relay_process(workdir, "--port", "0", "--redis-url", url, env=child_env(**env)))
    await node.started()
    return node


async def test_an_acl_user_and_password_in_the_url_log_in_and_a_wrong_one_is_reported(tmp_path: Path) -> None:
    with trio.fail_after(30):
        async with redis_server(tmp_path) as redis, AsyncExitStack() as stack:
            assert await redis.command("ACL", "SETUSER", "relay", "on", ">s3cret:pw", "~relay:*",
                                       "&relay:*", "+@all") == "OK"
            good = await _node(stack, tmp_path, f"redis://relay:s3cret%3Apw@127.0.0.1:{redis.port}/0")
            await wait_ready(good)
            async with client(good) as sub:
                await sub.subscribe("acl")
                status, _ = await http(good, "POST", "/api/publish", {"channel": "acl", "data": 1})
                assert status == 200
                assert (await sub.recv())["data"] == 1
            bad = await _node(stack, tmp_path, f"redis://relay:wrong@127.0.0.1:{redis.port}/0")
            body = await _not_ready_because(bad, "WRONGPASS")
            assert "WRONGPASS" in body and "relay:***@" in body and "wrong" not in body.replace("WRONGPASS", ""), body
            assert "s3cret" not in good.output + bad.output


async def test_rediss_connects_over_tls_and_checks_the_certificate(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    with trio.fail_after(30):
        async with redis_server(tmp_path) as plain:
            tls_port = plain.port  # reuse the free port: the TLS server below takes it
        async with redis_server(
                tmp_path, tls_port, "--port", "0", "--tls-port", str(tls_port),
                "--tls-cert-file", str(tmp_path / "cert.pem"), "--tls-key-file", str(tmp_path / "key.pem"),
                "--tls-ca-cert-file", str(tmp_path / "ca.pem"), "--tls-auth-clients", "no",
                tls=True) as redis, AsyncExitStack() as stack:
            url = f"rediss://localhost:{redis.port}/0"
            trusted = await _node(stack, tmp_path, url, SSL_CERT_FILE=str(tmp_path / "ca.pem"))
            await wait_ready(trusted)
            async with client(trusted) as sub:
                await sub.subscribe("secure")
                status, _ = await http(trusted, "POST", "/api/publish", {"channel": "secure", "data": "tls"})
                assert status == 200
                assert (await sub.recv())["data"] == "tls"
            untrusted = await _node(stack, tmp_path, url)  # the system's CAs do not know this one
            body = await _not_ready_because(untrusted, "certificate verify failed")
            assert body.startswith(f"redis rediss://localhost:{redis.port}/0 unavailable"), body
