"""The agent's memory savings change nothing it computes: programs compiled before the CEL parser is
dropped still evaluate, a later compile builds a parser again, and httpx still works without its
command-line client. Each runs in a fresh interpreter, as the agent starts."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def run_python(code: str) -> str:
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_programs_compiled_before_the_parser_is_released_still_evaluate_and_later_ones_compile() -> None:
    out = run_python(
        """
        import celpy
        from celpy.celparser import CELParser
        from kubemeter.agent.memory import release_freed_memory
        from kubemeter.pipeline.cel import compile_program, run_program

        event = {"event": celpy.json_to_cel({"data": {"value": 1.5}})}
        before = compile_program("double(event.data.value) > 1.0")
        release_freed_memory()
        print(CELParser.CEL_PARSER is None)
        print(bool(run_program(before, event)))
        after = compile_program("double(event.data.value) > 2.0")
        print(CELParser.CEL_PARSER is not None, bool(run_program(after, event)))
        """
    )
    assert out.splitlines() == ["True", "True", "True False"]


def test_httpx_without_its_command_line_client_still_sends_requests() -> None:
    out = run_python(
        """
        import sys
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        from kubemeter.agent.memory import skip_unused_modules

        skip_unused_modules()
        import httpx

        class Accept(BaseHTTPRequestHandler):
            def do_POST(self):
                self.rfile.read(int(self.headers["Content-Length"]))
                self.send_response(204)
                self.end_headers()

        server = ThreadingHTTPServer(("127.0.0.1", 0), Accept)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        with httpx.Client() as client:
            url = f"http://127.0.0.1:{server.server_port}/v1/events"
            status = client.post(url, json={"id": "1"}).status_code
        server.shutdown()
        print(status, "click" in sys.modules, "rich" in sys.modules)
        """
    )
    assert out == "204 False False"
