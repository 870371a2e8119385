"""`eglo api`: the API under uvicorn, until SIGTERM."""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn

from worker.api.app import create_app
from worker.api.auth import TokenFileError, TokenTable
from worker.settings import Settings


def load_tokens(settings: Settings) -> TokenTable:
    if settings.api_tokens_file is None:
        raise TokenFileError("EGLO_API_TOKENS_FILE is not set: the API admits no one without it")
    tokens = TokenTable.load(settings.api_tokens_file)
    if not len(tokens):
        raise TokenFileError(f"{settings.api_tokens_file} holds no tokens")
    return tokens


class _Server(uvicorn.Server):
    """SIGTERM is how a pod is stopped: shut down gracefully, then exit 0. (uvicorn re-raises a
    captured signal after its shutdown, which would end the process killed by SIGTERM.)"""

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


async def run_api(settings: Settings, tokens: TokenTable) -> int:
    config = uvicorn.Config(
        create_app(settings, tokens),
        host=settings.api_host,
        port=settings.api_port,
        log_config=None,  # eglo's logging; the access log has paths, never headers or tokens
        lifespan="on",
        proxy_headers=True,
        timeout_graceful_shutdown=int(settings.api_max_wait_s) + 5,
    )
    server = _Server(config)
    await server.serve()
    return 0 if server.started else 1


def main_error(message: str) -> int:
    print(f"eglo api: {message}", file=sys.stderr)
    return 2
