"""A stand-in for `vllm serve` that bench/llm.py measures against: an OpenAI-compatible chat endpoint
on 127.0.0.1 whose capacity is set, like a GPU's, not by its own CPU.

vLLM runs at most `max_num_seqs` sequences at once and queues the rest; here each request holds one
of `--max-num-seqs` slots for `--step-s` seconds (its "decode"), so the server answers at most
max_num_seqs / step_s requests per second, whatever the number in flight, and spends little CPU
of its own (asyncio, as vLLM's uvicorn). The tests' FakeLLMServer (a thread per connection, for
fault injection) saturated its one core instead, and with 512 connections its throughput swung
from 1 to 8 s per 1,024 requests, run to run, more than the effect measured.

Answers are a realistic ~50-word description (QC then costs what it costs on real answers) that
passes QC for every seed of the sample corpus.

    python bench/fake_vllm.py --cores 1 --max-num-seqs 32 --step-s 0.05   # prints its base URL
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket

from aiohttp import web

ANSWER = ("The recording holds one clear voice reading a single sentence at a steady pace. There is "
          "little background noise, the words are easy to follow from start to finish, and the delivery "
          "stays even throughout, without long pauses or sudden changes in loudness between the phrases.")
MODEL = "fake-served-model"


def make_app(max_num_seqs: int, step_s: float) -> web.Application:
    slots = asyncio.Semaphore(max_num_seqs)
    completion_tokens = len(ANSWER.split())

    async def chat(request: web.Request) -> web.Response:
        body = await request.json()
        prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
        async with slots:  # one running sequence; the others wait in the queue, as in vLLM
            await asyncio.sleep(step_s)
        return web.Response(content_type="application/json", text=json.dumps({
            "id": "cmpl-bench", "object": "chat.completion", "model": MODEL,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }))

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    app.router.add_get("/v1/models", models)
    return app


async def serve(max_num_seqs: int, step_s: float) -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    runner = web.AppRunner(make_app(max_num_seqs, step_s), access_log=None)
    await runner.setup()
    await web.SockSite(runner, sock, backlog=4096).start()
    host, port = sock.getsockname()[:2]
    print(f"http://{host}:{port}/v1", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cores", default="", help="CPU cores to pin to, e.g. 1 or 2,3")
    parser.add_argument("--max-num-seqs", type=int, default=32)
    parser.add_argument("--step-s", type=float, default=0.05)
    args = parser.parse_args()
    if args.cores:
        os.sched_setaffinity(0, [int(c) for c in args.cores.split(",")])
    asyncio.run(serve(args.max_num_seqs, args.step_s))


if __name__ == "__main__":
    main()
