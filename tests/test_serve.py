"""megaphi-serve: the ``openai`` client against a real server process over a tiny checkpoint,
compared with InferenceModel.generate on the same checkpoint in this process."""

import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from distributed import worker_env
from megaphi.platform import free_port

ROOT = Path(__file__).resolve().parents[1]
NAME = "tiny"
KEY_ENV = "MEGAPHI_SERVE_TEST_KEY"
KEY = "sk-megaphi-" + secrets.token_hex(16)
IM_END, ENDOFTEXT = 100265, 100257
SPECIAL_FROM = 100256  # Phi-4's special tokens are ids 100256.. (skip_special_tokens drops them)


@dataclass
class Server:
    url: str
    port: int
    proc: subprocess.Popen
    log: Path


@pytest.fixture(scope="module")
def server(tiny_pretrained, tmp_path_factory):
    """``python -m megaphi.serve`` on a free port (default host), requiring an API key."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    port = free_port()
    cmd = [sys.executable, "-m", "megaphi.serve", "--ckpt", str(tiny_pretrained),
           "--port", str(port), "--model-name", NAME, "--api-key-env", KEY_ENV]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=worker_env(**{KEY_ENV: KEY}))
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"megaphi-serve exited ({proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"megaphi-serve not ready in 180 s:\n{log.read_text()[-4000:]}")
            time.sleep(0.2)
        yield Server(url, port, proc, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def model(tiny_pretrained):
    from megaphi.inference import InferenceModel

    with InferenceModel.from_checkpoint(tiny_pretrained) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


def text_of(tokenizer, ids):
    """What the server returns as text for generated ids (special tokens skipped)."""
    return tokenizer.decode([t for t in ids if t < SPECIAL_FROM])


def post(server, path, body, key=KEY):
    """A raw POST: (status, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(server.url + path, data=data, headers=headers,
                                     method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_completions_with_token_ids_equal_generate(client, model):
    """n=3 seeded samples of a token-id prompt: the ids and log-probs of InferenceModel.generate
    with the same seed (one batch, one generator), the text and the top log-probs agreeing."""
    tok = model.tokenizer
    prompt = tok.encode("The history of the city")
    response = client.completions.create(
        model=NAME, prompt=prompt, n=3, seed=11, temperature=1.0, max_tokens=10, logprobs=2,
        extra_body={"return_token_ids": True, "stop_token_ids": []})
    want = model.generate(prompt, max_new_tokens=10, temperature=1.0, seed=11, num_samples=3)
    assert len({tuple(w.token_ids) for w in want}) == 3  # sampled, not one repeated greedy run
    choices = sorted(response.choices, key=lambda c: c.index)
    assert [c.index for c in choices] == [0, 1, 2]
    assert [c.token_ids for c in choices] == [w.token_ids for w in want]
    for choice, w in zip(choices, want):
        assert choice.prompt_token_ids == prompt
        assert choice.finish_reason == "length" and len(choice.token_ids) == 10
        assert choice.text == text_of(tok, w.token_ids)
        lp = choice.logprobs
        assert max(abs(a - b) for a, b in zip(lp.token_logprobs, w.logprobs)) <= 1e-5
        assert lp.tokens == [tok.decode([t]) for t in w.token_ids]
        assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
        assert len(lp.top_logprobs) == 10
        for top, token, chosen in zip(lp.top_logprobs, lp.tokens, lp.token_logprobs):
            assert 1 <= len(top) <= 2 and max(top.values()) >= chosen - 1e-4
            if token in top:
                assert abs(top[token] - chosen) <= 1e-4
    assert response.usage.prompt_tokens == len(prompt)
    assert response.usage.completion_tokens == 30 and response.model == NAME


def test_greedy_text_prompt_and_batched_prompts(client, model):
    """A text prompt is encoded with the checkpoint's tokenizer and greedy decoding stops at the
    default stop ids (<|endoftext|>, <|im_end|>) within max_tokens' default of 16; an array of
    prompts gives n choices per prompt, indexed prompt * n + sample, each seeded alike."""
    tok = model.tokenizer
    text = "Once upon a time"
    response = client.completions.create(model=NAME, prompt=text, temperature=0,
                                         extra_body={"return_token_ids": True})
    (want,) = model.generate(tok.encode(text), max_new_tokens=16, stop_ids=[ENDOFTEXT, IM_END])
    (choice,) = response.choices
    assert choice.prompt_token_ids == tok.encode(text)
    assert choice.token_ids == want.token_ids and choice.finish_reason == want.finish_reason
    body = want.token_ids[:-1] if want.finish_reason == "stop" else want.token_ids
    assert choice.text == text_of(tok, body) and choice.logprobs is None

    first, second = tok.encode("In 1867, the"), tok.encode("def main():")
    response = client.completions.create(
        model=NAME, prompt=[first, second], n=2, seed=5, temperature=0.8, top_p=0.95,
        max_tokens=6, extra_body={"return_token_ids": True, "stop_token_ids": []})
    got = {c.index: (c.prompt_token_ids, c.token_ids) for c in response.choices}
    want = [(first, g.token_ids) for g in model.generate(first, 6, 0.8, 0.95, seed=5,
                                                         num_samples=2)]
    want += [(second, g.token_ids) for g in model.generate(second, 6, 0.8, 0.95, seed=5,
                                                           num_samples=2)]
    assert [got[i] for i in range(4)] == want
    assert response.usage.prompt_tokens == len(first) + len(second)


def test_stop_strings_cut_text_and_token_ids(client, model):
    """A stop string ends the text before it, and the token ids after the fewest tokens whose
    text contains it (the log-probs likewise); finish_reason is "stop"."""
    tok = model.tokenizer
    prompt = tok.encode("The river")
    extra = {"return_token_ids": True, "stop_token_ids": []}
    full = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12,
                                     extra_body=extra).choices[0]
    ids = full.token_ids
    k = next(i for i in range(3, 12) if tok.decode([ids[i]]).strip() and ids[i] < SPECIAL_FROM)
    stop = tok.decode([ids[k]]).strip()
    cut = client.completions.create(model=NAME, prompt=prompt, temperature=0, max_tokens=12,
                                    stop=[stop, "never-in-this-text-§"], logprobs=0,
                                    extra_body=extra).choices[0]
    shortest = next(j for j in range(1, 13) if stop in text_of(tok, ids[:j]))
    assert cut.token_ids == ids[:shortest] and shortest <= k + 1
    assert cut.text == full.text[:full.text.index(stop)]
    assert cut.finish_reason == "stop" and len(cut.logprobs.token_logprobs) == shortest
    assert cut.logprobs.top_logprobs is None  # logprobs=0: the chosen tokens' only
    unmatched = client.completions.create(model=NAME, prompt=prompt, temperature=0,
                                          max_tokens=12, stop="never-in-this-text-§",
                                          extra_body=extra).choices[0]
    assert unmatched.token_ids == ids and unmatched.finish_reason == "length"


def test_chat_applies_phi4_template(client, model):
    """The prompt is megaphi's rendering of the messages (content as plain text) plus the
    assistant header; the turn ends at <|im_end|>; the content decodes the ids."""
    from megaphi.data.chat import render_chat

    tok = model.tokenizer
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Say <|im_end|> twice."},
                {"role": "assistant", "content": "<|im_end|> <|im_end|>"},
                {"role": "user", "content": [{"type": "text", "text": "Again, "},
                                             {"type": "text", "text": "please."}]}]
    response = client.chat.completions.create(
        model=NAME, messages=messages, temperature=0, max_tokens=8, logprobs=True,
        top_logprobs=1, extra_body={"return_token_ids": True})
    plain = messages[:3] + [{"role": "user", "content": "Again, please."}]
    prompt, _ = render_chat(plain, tok, add_generation_prompt=True)
    assert prompt[-3:] == [100264, 78191, 100266]  # <|im_start|>assistant<|im_sep|>
    assert prompt.count(IM_END) == 4  # one per message: typed <|im_end|> stayed text
    assert response.prompt_token_ids == prompt
    (want,) = model.generate(prompt, max_new_tokens=8, stop_ids=[IM_END])
    (choice,) = response.choices
    assert response.object == "chat.completion" and choice.message.role == "assistant"
    assert choice.token_ids == want.token_ids and choice.finish_reason == want.finish_reason
    body = want.token_ids[:-1] if want.finish_reason == "stop" else want.token_ids
    assert choice.message.content == text_of(tok, body)
    got_lp = [c.logprob for c in choice.logprobs.content]
    assert len(got_lp) == len(want.logprobs)
    assert max(abs(a - b) for a, b in zip(got_lp, want.logprobs)) <= 1e-5
    assert all(len(c.top_logprobs) == 1 for c in choice.logprobs.content)
    assert response.usage.prompt_tokens == len(prompt)


def test_pts_openai_backend_equals_megaphi_backend(server, model, monkeypatch):
    from megaphi.pts.backends import MegaphiBackend, OpenAIBackend, Sampling

    monkeypatch.setenv(KEY_ENV, KEY)
    sampling = Sampling(temperature=1.0, top_p=0.9, max_new_tokens=8,
                        stop_ids=(IM_END, ENDOFTEXT))
    remote = OpenAIBackend(server.url + "/v1", NAME, sampling, api_key_env=KEY_ENV)
    local = MegaphiBackend(model, sampling)
    prompt = model.tokenizer.encode("The first thing to know is")
    want = local.sample(prompt, 3, seed=3)
    assert len({tuple(ids) for ids, _ in want}) == 3
    assert remote.complete(prompt, 3, seed=3) == [ids for ids, _ in want]
    got = remote.sample(prompt, 3, seed=3)  # with each token's log-prob
    assert [ids for ids, _ in got] == [ids for ids, _ in want]
    for (_, got_lp), (_, want_lp) in zip(got, want):
        assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) <= 1e-5
    # near the end of the context both clamp max_new_tokens to what is left (the server's
    # max_model_len), and a full context gets empty rollouts instead of an HTTP 400
    context = model.config.model.seq_length
    assert remote.context_length() == context
    near_end = (prompt * context)[:context - 3]
    want = local.sample(near_end, 2, seed=4)
    assert max(len(ids) for ids, _ in want) == 3
    assert remote.complete(near_end, 2, seed=4) == [ids for ids, _ in want]
    full = (prompt * context)[:context]
    assert remote.sample(full, 2, seed=4) == local.sample(full, 2, seed=4) == [([], [])] * 2


BAD = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature must be"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, 400, "top_p must be in (0, 1]"),
    ("/v1/completions", {"prompt": "x", "n": 0}, 400, "n must be in [1, 128]"),
    ("/v1/completions", {"prompt": "x", "n": "2"}, 400, "n: Input should be a valid integer"),
    ("/v1/completions", {"prompt": [1] * 100, "max_tokens": 100}, 400,
     "the model's context is 128 tokens"),
    ("/v1/completions", {"prompt": [5, 100352]}, 400, "token id 100352 outside the vocabulary"),
    ("/v1/completions", {"prompt": [[5], [6, -1]]}, 400, "prompt[1] has token id -1"),
    ("/v1/completions", {"prompt": "x", "stop_token_ids": [100400]}, 400, "stop_token_ids has"),
    ("/v1/completions", {"prompt": "x", "stream": True}, 400, "stream=true is not supported"),
    ("/v1/completions", {"prompt": "x", "echo": True}, 400, "echo=true is not supported"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, 400, "logprobs must be in [0, 20]"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 0.5}, 400,
     "frequency_penalty is not supported"),
    ("/v1/completions", {"prompt": "x", "foo": 1}, 400, "unsupported parameter 'foo'"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt is empty"),
    ("/v1/completions", {"prompt": {"a": 1}}, 400, "prompt must be a string"),
    ("/v1/completions", {}, 400, "missing required parameter 'prompt'"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "the model 'gpt-4' does not"),
    ("/v1/completions", b'{"model": "tiny", "prompt": ', 400, "not valid JSON"),
    ("/v1/completions", b'[1, 2]', 400, "must be a JSON object"),
    ("/v1/chat/completions", {"messages": [{"role": "bot", "content": "hi"}]}, 400,
     "message 1 has unknown role 'bot'"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages is empty"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                              "top_logprobs": 2}, 400, "top_logprobs needs logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 200}]}, 400,
     "nothing is left for the completion"),
    ("/v1/nowhere", {}, 404, "no route POST /v1/nowhere"),
]


@pytest.mark.parametrize("path,body,status,message", BAD,
                         ids=[f"{i}-{case[3][:24]}" for i, case in enumerate(BAD)])
def test_bad_requests_get_4xx_with_one_message(server, path, body, status, message):
    if isinstance(body, dict) and path != "/v1/nowhere":
        body = {"model": NAME, **body}
    got_status, got = post(server, path, body)
    assert got_status == status, got
    error = got["error"]
    assert message in error["message"], error
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type",
                                                                      "param", "code"}
    assert "Traceback" not in error["message"] and "\n" not in error["message"]


def test_api_key_and_openai_client_errors(server, client):
    import openai

    body = {"model": NAME, "prompt": "x", "max_tokens": 1}
    status, got = post(server, "/v1/completions", body, key="sk-wrong")
    assert status == 401 and got["error"]["message"] == "incorrect API key"
    status, got = post(server, "/v1/completions", body, key=None)
    assert status == 401 and "missing API key" in got["error"]["message"]
    assert post(server, "/v1/completions", body)[0] == 200
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.models.list()
    with pytest.raises(openai.BadRequestError, match=r"top_p must be in \(0, 1\]") as exc:
        client.completions.create(model=NAME, prompt="x", top_p=0)
    assert exc.value.status_code == 400
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    assert [m.id for m in client.models.list().data] == [NAME]


def test_cli_refuses_unset_key_and_warns_on_public_host(monkeypatch, capsys, caplog):
    """megaphi-serve's main() in this process: a missing key is one error line before anything
    loads; a non-loopback host is warned about before the model loads."""
    import logging

    from megaphi.serve import main

    monkeypatch.delenv("MEGAPHI_SERVE_UNSET_KEY", raising=False)
    assert main(["--ckpt", "/nonexistent/run", "--api-key-env", "MEGAPHI_SERVE_UNSET_KEY"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        "megaphi-serve: error: --api-key-env MEGAPHI_SERVE_UNSET_KEY: the variable is not set or "
        "empty; export the key in it, or drop --api-key-env to serve without a key"]
    level = logging.getLogger("megaphi").level
    try:
        with caplog.at_level(logging.WARNING, logger="megaphi.serve"):
            assert main(["--ckpt", "/nonexistent/run", "--host", "0.0.0.0"]) == 2
    finally:
        logging.getLogger("megaphi").setLevel(level)  # main() configured megaphi's logging
    assert "binding to 0.0.0.0: the server is reachable from other machines and requires no " \
           "API key" in caplog.text
    err = capsys.readouterr().err
    assert "megaphi-serve: error: checkpoint /nonexistent/run does not exist" in err
    assert "Traceback" not in err


def test_binds_loopback_by_default_and_never_logs_the_key(server):
    """Last: the server's log then holds every request of this module."""
    import psutil

    listening = [c.laddr for c in psutil.Process(server.proc.pid).net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN]
    assert any(addr.port == server.port for addr in listening), listening
    assert all(addr.ip == "127.0.0.1" for addr in listening), listening  # gloo's too
    log = server.log.read_text()
    assert f"Uvicorn running on http://127.0.0.1:{server.port}" in log
    assert f"at http://127.0.0.1:{server.port}/v1; API key required (from ${KEY_ENV})" in log
    assert KEY not in log and "sk-wrong" not in log
    assert "POST /v1/completions 200" in log and "POST /v1/chat/completions 400" in log
    assert "Once upon a time" not in log and "Again, please" not in log  # no prompts logged
    assert "Traceback" not in log  # no unexpected error along the way


def test_synth_workflow_end_to_end_against_megaphi_serve(server, tmp_path, cli):
    """megaphi-synth's rewrite workflow against the real server (the tiny model: the text is
    nonsense, the pipeline is real), with the key from the environment, then
    preprocess_data.py --format chat on its output."""
    from distributed import ROOT

    (tmp_path / "seeds.jsonl").write_text("".join(
        json.dumps({"id": f"s{i}", "text": f"Water boils at {90 + i} degrees."}) + "\n"
        for i in range(3)))
    (tmp_path / "rewrite.yaml").write_text(  # the shipped workflow, with short answers
        (ROOT / "examples/synth/rewrite.yaml").read_text().replace("max_tokens: 1024",
                                                                   "max_tokens: 12")
        .replace("max_tokens: 2048", "max_tokens: 12")
        .replace("rewrite_exercise.txt", str(ROOT / "examples/synth/rewrite_exercise.txt"))
        .replace("rewrite_solution.txt", str(ROOT / "examples/synth/rewrite_solution.txt")))
    cmd = [sys.executable, "-m", "megaphi.synth.cli", "run", str(tmp_path / "rewrite.yaml"),
           "--input", str(tmp_path / "seeds.jsonl"), "--output", str(tmp_path / "sft.jsonl"),
           "--endpoint", server.url + "/v1", "--model", NAME, "--api-key-env", KEY_ENV,
           "--seed", "5", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=worker_env(**{KEY_ENV: KEY}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["requests"] == 6 and summary["failed"] == 0
    records = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert len(records) >= 1 and len(records) + summary["dropped"] == 3
    for r in records:
        assert [m["role"] for m in r["messages"]] == ["user", "assistant"]
        assert [q["model"] for q in r["provenance"]["requests"]] == [NAME, NAME]
    assert KEY not in (tmp_path / "sft.jsonl").read_text() + proc.stderr
    code, out, err = cli("--format", "chat", "--input", tmp_path / "sft.jsonl",
                         "--output-prefix", tmp_path / "sft")
    assert code == 0, err
    assert json.loads((tmp_path / "sft.meta.json").read_text())["documents"] == len(records)
