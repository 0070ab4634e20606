"""Model registry, sam_tiny, and checkpoint resolution against a local HTTP server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from ptqbench.errors import CheckpointError, UnknownNameError
from ptqbench.models.checkpoints import UNTRAINED_SHA256, load_model, resolve_checkpoint
from ptqbench.models.sam1.adapter import ADAPTER
from ptqbench.models.sam1.models import SAM_TINY_PACKAGED, build_sam_tiny
from ptqbench.models.spec import MODELS, ModelSpec

PAYLOAD = bytes(range(256)) * 10_000  # 2.56 MB: several download chunks
PAYLOAD_SHA256 = hashlib.sha256(PAYLOAD).hexdigest()
PAYLOAD_MD5 = hashlib.md5(PAYLOAD).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves `server.files[path] = (body, mode)`; mode "ok", "short" (lies about the length)
    or "nolength" (no Content-Length, body ends when the connection closes)."""

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        if self.path not in self.server.files:
            self.send_error(404)
            return
        body, mode = self.server.files[self.path]
        self.send_response(200)
        if mode == "ok":
            self.send_header("Content-Length", str(len(body)))
        elif mode == "short":
            self.send_header("Content-Length", str(len(body) + 1000))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def server(monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    httpd.files = {}
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()
    thread.join()


def _url(httpd, path: str) -> str:
    return f"http://127.0.0.1:{httpd.server_address[1]}{path}"


def _spec(url: str, sha256: str = PAYLOAD_SHA256, md5_prefix: str | None = PAYLOAD_MD5[:6]) -> ModelSpec:
    return ModelSpec(name="fake", build=build_sam_tiny, input_size=256, adapter=ADAPTER, file_name="fake_ckpt.pth",
                     url=url, sha256=sha256, md5_prefix=md5_prefix)


def _files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_success_lands_in_cache(server, tmp_path):
    server.files["/ckpt.pth"] = (PAYLOAD, "ok")
    resolved = resolve_checkpoint(_spec(_url(server, "/ckpt.pth")), cache_dir=tmp_path, progress=True)
    assert resolved.path == tmp_path / "fake_ckpt.pth"
    assert resolved.sha256 == PAYLOAD_SHA256 and resolved.verified
    assert resolved.path.read_bytes() == PAYLOAD
    assert _files(tmp_path) == ["fake_ckpt.pth"]  # no .part left behind


def test_download_without_content_length_and_progress_bar(server, tmp_path):
    server.files["/ckpt.pth"] = (PAYLOAD, "nolength")
    resolved = resolve_checkpoint(_spec(_url(server, "/ckpt.pth")), cache_dir=tmp_path, progress=True)
    assert resolved.path.read_bytes() == PAYLOAD


def test_download_sha_mismatch_is_rejected_and_deleted(server, tmp_path):
    server.files["/ckpt.pth"] = (PAYLOAD, "ok")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(_spec(_url(server, "/ckpt.pth"), sha256="0" * 64), cache_dir=tmp_path, progress=False)
    message = str(err.value)
    assert PAYLOAD_SHA256 in message and "0" * 64 in message and "deleted" in message
    assert _files(tmp_path) == []


def test_download_md5_prefix_mismatch_is_rejected(server, tmp_path):
    server.files["/ckpt.pth"] = (PAYLOAD, "ok")
    with pytest.raises(CheckpointError, match="md5"):
        resolve_checkpoint(_spec(_url(server, "/ckpt.pth"), md5_prefix="ffffff"), cache_dir=tmp_path,
                           progress=False)
    assert _files(tmp_path) == []


def test_download_of_truncated_file_is_rejected(server, tmp_path):
    server.files["/ckpt.pth"] = (PAYLOAD[: len(PAYLOAD) // 2], "ok")
    with pytest.raises(CheckpointError, match="sha256"):
        resolve_checkpoint(_spec(_url(server, "/ckpt.pth")), cache_dir=tmp_path, progress=False)
    assert _files(tmp_path) == []


def test_download_that_stops_early_is_rejected(server, tmp_path):
    server.files["/ckpt.pth"] = (PAYLOAD, "short")
    with pytest.raises(CheckpointError, match="ckpt.pth"):
        resolve_checkpoint(_spec(_url(server, "/ckpt.pth")), cache_dir=tmp_path, progress=True)
    assert _files(tmp_path) == []


def test_download_http_error_says_what_to_do(server, tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(_spec(_url(server, "/missing.pth")), cache_dir=tmp_path, progress=False)
    assert "404" in str(err.value) and str(tmp_path / "fake_ckpt.pth") in str(err.value)
    assert _files(tmp_path) == []


def test_cache_hit_needs_no_network(tmp_path):
    (tmp_path / "fake_ckpt.pth").write_bytes(PAYLOAD)
    resolved = resolve_checkpoint(_spec("http://127.0.0.1:9/unreachable.pth"), cache_dir=tmp_path)
    assert resolved.path == tmp_path / "fake_ckpt.pth" and resolved.sha256 == PAYLOAD_SHA256


def test_cache_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("PTQBENCH_CACHE", str(tmp_path))
    (tmp_path / "fake_ckpt.pth").write_bytes(PAYLOAD)
    assert resolve_checkpoint(_spec("http://127.0.0.1:9/x.pth"), download=False).path == tmp_path / "fake_ckpt.pth"


def test_corrupt_cached_file_is_rejected(tmp_path):
    cached = tmp_path / "fake_ckpt.pth"
    cached.write_bytes(PAYLOAD[:-1] + b"\x00")
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(_spec("http://127.0.0.1:9/x.pth"), cache_dir=tmp_path)
    assert str(cached) in str(err.value) and PAYLOAD_SHA256 in str(err.value) and "Delete it" in str(err.value)


def test_offline_without_file_says_where_to_put_it(tmp_path):
    with pytest.raises(CheckpointError) as err:
        resolve_checkpoint(_spec("https://example.invalid/fake_ckpt.pth"), cache_dir=tmp_path, download=False)
    message = str(err.value)
    assert str(tmp_path / "fake_ckpt.pth") in message and "https://example.invalid/fake_ckpt.pth" in message


def test_official_specs():
    assert MODELS.names() == ["sam_tiny", "sam_vit_b", "sam_vit_h", "sam_vit_l"]
    spec = MODELS.get("vit_b")()
    assert spec.name == "sam_vit_b" and spec.input_size == 1024
    assert spec.url == "https://dl.fbaipublicfiles.com/segment_anything/sam_vit_b_01ec64.pth"
    assert spec.md5_prefix == "01ec64"
    assert spec.sha256 == "ec2df62732614e57411cdcf32a23ffdf28910380d03139ee0f4fcbe91eb8c912"
    assert MODELS.get("sam_vit_h")().md5_prefix == "4b8939"
    with pytest.raises(UnknownNameError, match="sam_vit_b"):
        MODELS.get("sam_vit_bb")


@pytest.fixture(scope="module")
def tiny_state_fp16() -> dict[str, torch.Tensor]:
    """A seed-1 sam_tiny state dict in fp16 (how the packaged file is stored)."""
    return {k: v.half() if v.is_floating_point() else v for k, v in build_sam_tiny(seed=1).state_dict().items()}


def _assert_weights_equal(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, value in state.items():
        assert loaded[key].dtype == torch.float32
        assert torch.equal(loaded[key], value.float()), key


def test_sam_tiny_shapes_and_determinism():
    state_before = torch.random.get_rng_state()
    first, second = build_sam_tiny(), build_sam_tiny()
    assert torch.equal(torch.random.get_rng_state(), state_before)  # the global RNG is untouched
    assert not first.training
    for (key, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), key
    other = build_sam_tiny(seed=1)
    assert not torch.equal(other.image_encoder.patch_embed.proj.weight, first.image_encoder.patch_embed.proj.weight)
    with torch.no_grad():
        embedding = first.image_encoder(torch.randn(1, 3, 256, 256, generator=torch.Generator().manual_seed(0)))
    assert embedding.shape == (1, 256, 16, 16)
    assert first.image_encoder.img_size == 256 and len(first.image_encoder.blocks) == 6
    assert [b.window_size for b in first.image_encoder.blocks] == [8, 8, 0, 8, 8, 0]
    assert first.pixel_mean.flatten().tolist() == pytest.approx([123.675, 116.28, 103.53])


def test_sam_tiny_without_packaged_weights_is_untrained(tmp_path):
    spec = replace(MODELS.get("sam_tiny")(), packaged=tmp_path / "sam_tiny.pt")
    loaded = load_model("sam_tiny", spec=spec)
    assert not loaded.trained and loaded.checkpoint_sha256 == UNTRAINED_SHA256 and loaded.checkpoint_path is None
    assert loaded.input_size == 256
    _assert_weights_equal(loaded.model, build_sam_tiny(seed=0).state_dict())


def test_load_sam_tiny_default_matches_packaged_state():
    loaded = load_model("sam_tiny")
    assert loaded.trained == SAM_TINY_PACKAGED.is_file()
    assert (loaded.checkpoint_sha256 == UNTRAINED_SHA256) != SAM_TINY_PACKAGED.is_file()


def test_packaged_weights_are_verified_and_loaded_as_fp32(tmp_path, tiny_state_fp16):
    packaged = tmp_path / "sam_tiny.pt"
    torch.save(tiny_state_fp16, packaged)
    sha = hashlib.sha256(packaged.read_bytes()).hexdigest()
    base = replace(MODELS.get("sam_tiny")(), packaged=packaged)

    loaded = load_model("sam_tiny", spec=replace(base, sha256=sha))
    assert loaded.trained and loaded.checkpoint_sha256 == sha and loaded.checkpoint_path == packaged
    _assert_weights_equal(loaded.model, tiny_state_fp16)

    with pytest.raises(CheckpointError, match=sha):
        load_model("sam_tiny", spec=replace(base, sha256="1" * 64))
    with pytest.raises(CheckpointError, match="no expected sha256"):
        load_model("sam_tiny", spec=replace(base, sha256=None))


def test_explicit_checkpoint_is_hashed_and_loaded(tmp_path, tiny_state_fp16):
    path = tmp_path / "finetuned.pt"
    torch.save(tiny_state_fp16, path)
    loaded = load_model("sam_tiny", checkpoint=str(path))
    assert loaded.trained and loaded.checkpoint_path == path
    assert loaded.checkpoint_sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    _assert_weights_equal(loaded.model, tiny_state_fp16)


def test_explicit_checkpoint_problems(tmp_path, tiny_state_fp16):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model("sam_tiny", checkpoint=tmp_path / "nope.pt")

    corrupt = tmp_path / "corrupt.pt"
    torch.save(tiny_state_fp16, corrupt)
    corrupt.write_bytes(corrupt.read_bytes()[:100_000])
    with pytest.raises(CheckpointError, match="corrupt.pt"):
        load_model("sam_tiny", checkpoint=corrupt)

    misfit = dict(tiny_state_fp16)
    del misfit["mask_decoder.iou_token.weight"]
    misfit["extra.weight"] = torch.zeros(2)
    misfit["image_encoder.pos_embed"] = torch.zeros(1, 64, 64, 192)
    wrong = tmp_path / "wrong.pt"
    torch.save(misfit, wrong)
    with pytest.raises(CheckpointError) as err:
        load_model("sam_tiny", checkpoint=wrong)
    message = str(err.value)
    assert "wrong.pt" in message and "mask_decoder.iou_token.weight" in message and "extra.weight" in message
    assert "image_encoder.pos_embed (1, 64, 64, 192) vs (1, 16, 16, 192)" in message

    not_a_state_dict = tmp_path / "wrapped.pt"
    torch.save({"model": tiny_state_fp16}, not_a_state_dict)
    with pytest.raises(CheckpointError, match="not a flat state dict"):
        load_model("sam_tiny", checkpoint=not_a_state_dict)


def test_download_then_load_then_cache_hit(server, tmp_path, tiny_state_fp16):
    source = tmp_path / "served.pt"
    torch.save(tiny_state_fp16, source)
    body = source.read_bytes()
    sha, md5 = hashlib.sha256(body).hexdigest(), hashlib.md5(body).hexdigest()
    server.files["/sam_fake.pth"] = (body, "ok")
    spec = replace(_spec(_url(server, "/sam_fake.pth"), sha256=sha, md5_prefix=md5[:6]), name="sam_fake")
    cache = tmp_path / "cache"

    loaded = load_model("ignored", cache_dir=cache, spec=spec, progress=False)
    assert loaded.name == "sam_fake" and loaded.trained and loaded.checkpoint_sha256 == sha
    assert loaded.checkpoint_path == cache / "fake_ckpt.pth"
    _assert_weights_equal(loaded.model, tiny_state_fp16)

    del server.files["/sam_fake.pth"]  # a second load must not need the server
    again = resolve_checkpoint(spec, cache_dir=cache, progress=False)
    assert again.path == cache / "fake_ckpt.pth" and again.sha256 == sha


def test_specs_carry_their_adapter_and_default_preset():
    """A spec names its family's adapter and its default preset, whatever alias names it;
    `adapter_for` finds the family of a plain model and of its quantizable twin."""
    from ptqbench.errors import PtqbenchError
    from ptqbench.models.adapter import adapter_for

    assert MODELS.get("tiny")().default_preset == MODELS.get("sam_tiny")().default_preset == "fast"
    assert {MODELS.get(name)().default_preset for name in ("sam_vit_b", "vit_l", "sam_vit_h")} == {"paper"}
    model = build_sam_tiny()
    assert adapter_for(model) is MODELS.get("tiny")().adapter is ADAPTER
    assert adapter_for(ADAPTER.quantized_twin(model, 4, 4)) is ADAPTER
    with pytest.raises(PtqbenchError, match="no model family owns a Linear"):
        adapter_for(torch.nn.Linear(2, 2))
