"""The ConsiStory+ runner against a small fake WebUI (http.server on 127.0.0.1, in a thread): sets, requests,
resume after a finished or an interrupted set, HTTP errors, the CLI's table. No weights, no network."""
from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lib_consistency.evaluate.consistory_plus import runner as runner_module
from lib_consistency.evaluate.consistory_plus.cli import main
from lib_consistency.evaluate.consistory_plus.runner import MARKER, Generation, Method, Runner, is_finished
from lib_consistency.evaluate.consistory_plus.sets import BenchmarkError, load_benchmark, select_sets
from lib_consistency.evaluate.consistory_plus.webui import WebUI
from lib_consistency.settings import Settings
from lib_consistency.story.format import parse_story
from tests.webui_png import infotext, png_bytes

BENCHMARK = """\
animals:
- concept_token: fox
  style: A watercolor painting of
  subject: A red fox with a white tail
  settings: [running in snow, sleeping in a log, swimming in a lake, eating berries, looking at the moon]
- concept_token: owl
  style: ''
  subject: An owl with golden eyes
  settings: [on a branch, in flight, at night, in the rain, on a fence, in a barn]
foods:
- concept_token: cake
  style: A photo of
  subject: A tall chocolate cake
  settings: [on a table, in a bakery window, at a party, in the rain, on a plate]
"""


class FakeWebUI(BaseHTTPRequestHandler):
    """Answers like A1111: scripts, txt2img (one image per frame for a story, else one), errors as JSON."""
    requests: list = []
    fail_on: int | None = None   # txt2img request number (1-based) answered with HTTP 500
    fallback_sampler: str | None = None  # A1111 draws with its default sampler when the name is unknown
    scripts = ["consistent story"]

    def log_message(self, *args):
        pass

    def answer(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/sdapi/v1/sd-models":
            return self.answer(200, [{"title": "tiny-sd15.safetensors [9b965036dd]", "model_name": "tiny-sd15",
                                      "filename": "/models/tiny-sd15.safetensors"}])
        if self.path == "/sdapi/v1/scripts":
            return self.answer(200, {"txt2img": type(self).scripts, "img2img": type(self).scripts})
        self.answer(404, {"detail": "Not Found"})

    def do_POST(self):
        payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        cls = type(self)
        cls.requests.append(payload)
        if self.path != "/sdapi/v1/txt2img":
            return self.answer(404, {"detail": "Not Found"})
        if cls.fail_on is not None and len(cls.requests) == cls.fail_on:
            return self.answer(500, {"error": "NansException", "detail": "", "body": "",
                                     "errors": "A tensor with all NaNs was produced in VAE."})
        size, seed = payload["width"], payload["seed"]
        drawn = dict(steps=payload["steps"], sampler=cls.fallback_sampler or payload["sampler_name"],
                     cfg_scale=float(payload["cfg_scale"]))
        story = payload.get("alwayson_scripts", {}).get("consistent story", {}).get("args", [{}])[0]
        if story.get("enabled"):
            settings = Settings.from_dict(story)
            parsed = parse_story(settings.story)
            prompts = [parsed.frame_prompt(i, payload["prompt"]) for i in range(len(parsed.frames))]
            texts = [infotext(p, seed, story=settings, style=payload["prompt"], size=size, **drawn) for p in prompts]
            salt = settings.preset
        else:
            texts, salt = [infotext(payload["prompt"], seed, size=size, **drawn)], "vanilla"
        images = [base64.b64encode(png_bytes(t, salt + t.split("\n")[0], size)).decode() for t in texts]
        self.answer(200, {"images": images, "parameters": {}, "info": "{}"})


@pytest.fixture
def server():
    FakeWebUI.requests, FakeWebUI.fail_on, FakeWebUI.scripts = [], None, ["consistent story"]
    FakeWebUI.fallback_sampler = None
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakeWebUI)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture
def bench(tmp_path):
    path = tmp_path / "bench.yaml"
    path.write_text(BENCHMARK)
    return path


def txt2img_count():
    return sum(1 for r in FakeWebUI.requests if r.get("prompt") != "warm-up")


def test_sets_are_read_and_chosen_round_robin(bench):
    sets, sha = load_benchmark(bench)
    assert [s.name for s in sets] == ["animals_0", "animals_1", "foods_0"] and len(sha) == 64
    assert [s.name for s in select_sets(sets, 2)] == ["animals_0", "foods_0"]
    assert [s.name for s in select_sets(sets, None, ["animals"])] == ["animals_0", "animals_1"]
    assert sets[1].identity == "An owl with golden eyes"
    assert sets[0].frame_prompts()[1] == "A watercolor painting of A red fox with a white tail, sleeping in a log"
    assert sets[0].story_text().splitlines()[0] == "A watercolor painting of A red fox with a white tail"


@pytest.mark.parametrize("call, message", [
    (lambda s: select_sets(s, 0), "--sets 0: expected a positive"),
    (lambda s: select_sets(s, 4), "--sets 4: only 3 sets"),
    (lambda s: select_sets(s, 1, ["plants"]), "--superclass 'plants' is not in the benchmark"),
    (lambda s: Method.preset("Bogus", {}), "'preset': 'Bogus' is not one of"),
    (lambda s: Method.preset("StoryDiffusion", {"csa_rate": "7"}), "'csa_rate': 7.0 is out of range"),
    (lambda s: Method.preset("StoryDiffusion", {"story": "x"}), "--set story: set by the benchmark"),
])
def test_bad_options_are_named(bench, call, message):
    with pytest.raises(BenchmarkError, match=message):
        call(load_benchmark(bench)[0])


@pytest.mark.parametrize("content, message", [
    (None, "not found"), ("animals: [1, 2", "not valid YAML"), ("animals:\n- style: a\n  subject: b\n", "settings"),
])
def test_bad_benchmark_file_is_named(tmp_path, content, message):
    path = tmp_path / "b.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(BenchmarkError, match=message) as error:
        load_benchmark(path)
    assert str(path) in str(error.value)


def test_generation_and_resume_skip_finished_sets(server, bench, tmp_path):
    sets = select_sets(load_benchmark(bench)[0], 2)
    generation = Generation(width=32, height=32, steps=2)
    method = Method.preset("StoryDiffusion", {"csa_rate": "0.25"})
    runner = Runner(WebUI(server), tmp_path / "out", generation, report=lambda _: None)
    runner.run(Method("vanilla"), sets)
    runner.run(method, sets)
    assert txt2img_count() == 5 + 5 + 2  # vanilla: one request per frame; the preset: one per set
    story_request = FakeWebUI.requests[-1]
    args = story_request["alwayson_scripts"]["consistent story"]["args"][0]
    assert args["preset"] == "StoryDiffusion" and args["csa_rate"] == 0.25 and args["storyboard"] is False
    assert (story_request["seed"], story_request["steps"], story_request["cfg_scale"]) == (42, 2, 5.0)
    assert method.label == "StoryDiffusion_csa_rate-0.25"
    for label in ("vanilla", method.label):
        assert all(is_finished(tmp_path / "out" / label / s.name, s) for s in sets)
    again = Runner(WebUI(server), tmp_path / "out", generation, report=lambda _: None)
    again.run(Method("vanilla"), sets)
    again.run(method, sets)
    assert txt2img_count() == 12 and len(FakeWebUI.requests) == 13  # nothing regenerated, no warm-up either


def test_an_interrupted_set_has_no_marker_and_is_generated_again(server, bench, tmp_path, monkeypatch):
    sets = select_sets(load_benchmark(bench)[0], 2)
    out = tmp_path / "out"
    written = []
    real_write = runner_module.atomic_write

    def killed_after_the_second_set_frame(path, data):
        real_write(path, data)
        written.append(path.name)
        if path.parent.name == "foods_0" and written.count("frame_01.png") == 2:
            raise KeyboardInterrupt  # the user killed the runner between two frames of foods_0
    monkeypatch.setattr(runner_module, "atomic_write", killed_after_the_second_set_frame)
    with pytest.raises(KeyboardInterrupt):
        Runner(WebUI(server), out, Generation(width=32, height=32, steps=2), report=lambda _: None).run(
            Method("vanilla"), sets)
    monkeypatch.setattr(runner_module, "atomic_write", real_write)
    assert is_finished(out / "vanilla" / "animals_0", sets[0])
    interrupted = out / "vanilla" / "foods_0"
    assert (interrupted / "frame_00.png").exists() and not (interrupted / MARKER).exists()
    assert not is_finished(out / "vanilla" / "foods_0", sets[1])
    before = txt2img_count()
    Runner(WebUI(server), out, Generation(width=32, height=32, steps=2), report=lambda _: None).run(
        Method("vanilla"), sets)
    assert txt2img_count() - before == 5  # foods_0 again, from its first frame; animals_0 skipped
    assert is_finished(out / "vanilla" / "foods_0", sets[1])


def test_http_errors_are_reported_and_leave_the_set_unfinished(server, bench, tmp_path):
    sets = select_sets(load_benchmark(bench)[0], 1)
    FakeWebUI.fail_on = 3  # warm-up, frame 0, then frame 1 fails
    runner = Runner(WebUI(server), tmp_path / "out", Generation(width=32, height=32), report=lambda _: None)
    with pytest.raises(BenchmarkError, match=r"txt2img answered HTTP 500: NansException: A tensor with all NaNs"):
        runner.run(Method("vanilla"), sets)
    assert not is_finished(tmp_path / "out" / "vanilla" / "animals_0", sets[0])


def test_a_webui_that_draws_with_other_parameters_is_refused(server, bench, tmp_path):
    sets = select_sets(load_benchmark(bench)[0], 1)
    FakeWebUI.fallback_sampler = "DPM++ 2M"
    runner = Runner(WebUI(server), tmp_path / "out", Generation(width=32, height=32, sampler="Bogus"),
                    report=lambda _: None)
    with pytest.raises(BenchmarkError, match=r"animals_0 frame 0: the WebUI used Sampler 'DPM\+\+ 2M' \(schedule "
                                             r"type Automatic\), not 'Bogus'"):
        runner.run(Method.preset("1Prompt1Story", {}), sets)
    assert not is_finished(tmp_path / "out" / "1Prompt1Story" / "animals_0", sets[0])


def test_the_model_must_be_one_of_the_servers(server, tmp_path):
    for title in ("tiny-sd15", "tiny-sd15.safetensors", "tiny-sd15.safetensors [9b965036dd]"):
        assert WebUI(server).model_name(title) == "tiny-sd15"
    with pytest.raises(BenchmarkError, match=r"--model 'nosuch': not a checkpoint of .* \(it has: tiny-sd15"):
        Runner(WebUI(server), tmp_path / "out", Generation(model="nosuch"), report=lambda _: None)
    assert not (tmp_path / "out").exists()


def test_webui_errors_name_the_url(server):
    with pytest.raises(BenchmarkError, match=r"cannot reach the WebUI at http://127\.0\.0\.1:1/sdapi/v1/scripts"):
        WebUI("http://127.0.0.1:1", timeout=5).check_extension()
    with pytest.raises(BenchmarkError, match="expected an http:// or https:// address"):
        WebUI("127.0.0.1:7860")
    with pytest.raises(BenchmarkError, match=r"/sdapi/v1/options answered HTTP 404 \(is the WebUI started with --api"):
        WebUI(server).call("/sdapi/v1/options")
    FakeWebUI.scripts = ["x/y/z plot"]
    with pytest.raises(BenchmarkError, match="Consistent Story extension is not installed"):
        WebUI(server).check_extension()


def test_other_generation_parameters_in_the_same_folder_are_refused(server, bench, tmp_path):
    sets = select_sets(load_benchmark(bench)[0], 1)
    Runner(WebUI(server), tmp_path / "out", Generation(width=32, height=32), report=lambda _: None)
    with pytest.raises(BenchmarkError, match=r"made with width = 32, not 64"):
        Runner(WebUI(server), tmp_path / "out", Generation(width=64, height=32), report=lambda _: None)
    assert sets


def test_cli_generates_scores_and_prints_table_1(server, bench, tmp_path, tiny_clip_path, capsys):
    common = ["--url", server, "--benchmark", str(bench), "--sets", "2", "--out", str(tmp_path / "runs"),
              "--width", "32", "--height", "32", "--steps", "2", "--clip", str(tiny_clip_path), "--device", "cpu",
              "--dreamsim", "off", "--background", "off", "--no-sheets"]
    assert main(common + ["--preset", "1Prompt1Story"]) == 0
    assert main(common + ["--preset", "StoryDiffusion"]) == 0
    out = capsys.readouterr().out
    assert "vanilla: 2 of 2 sets already finished, 0 to generate" in out  # the second run reuses vanilla
    table = out[out.rindex("| Method"):].splitlines()
    assert [line.split(" | ")[0] for line in table[2:5]] == ["| Vanilla", "| 1Prompt1Story", "| StoryDiffusion"]
    assert all(line.split(" | ")[-2] == "2" for line in table[2:5])  # steps
    assert "ConsiStory+: 2 of 2 chosen sets (10 frames), finished by every run; seed 42, 32x32, 2 steps, CFG 5" in out
    assert (tmp_path / "runs" / "table.md").read_text() in out
    assert (tmp_path / "runs" / "StoryDiffusion" / "evaluation" / "scores.csv").exists()

    (tmp_path / "runs" / "StoryDiffusion" / "foods_0" / "done.json").unlink()  # as if interrupted in foods_0
    assert main([a for a in common if a not in ("--url", server)] + ["--eval-only"]) == 0
    out = capsys.readouterr().out
    assert "vanilla: 2 sets finished; the table compares the 1 that every run has" in out
    assert "ConsiStory+: 1 of 2 chosen sets (5 frames), finished by every run" in out
    assert out.count("| 2 | ") == 3  # still three rows, each scored on animals_0 only


def test_cli_errors_name_the_field(bench, tmp_path, capsys):
    assert main(["--url", "http://127.0.0.1:1", "--benchmark", str(bench), "--preset", "Nope"]) == 2
    assert "'preset': 'Nope' is not one of" in capsys.readouterr().err
    assert main(["--url", "http://127.0.0.1:1", "--benchmark", str(tmp_path / "none.yaml"), "--preset", "Custom"]) == 2
    assert "none.yaml not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--sets", "zero"])
    assert "argument --sets: expected a positive whole number, got 'zero'" in capsys.readouterr().err
