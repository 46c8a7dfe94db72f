"""Image tokenizers: codes of the right grid, decoding back to pixels, a vq tokenizer that learns
and reports its codebook's use, and the exact palette code."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
import torch

from fusionlm.config import ImageTokenizerConfig
from fusionlm.data.world.render import render_image
from fusionlm.data.world.scenes import draw_scene, training_scene
from fusionlm.errors import ConfigError
from fusionlm.evaluate.geneval import check
from fusionlm.image_tokenizers import IMAGE_TOKENIZERS, build_image_tokenizer, psnr, images_of, pixels_of, usage


def _pictures(n: int, size: int, seed: int = 0):
    rng = random.Random(seed)
    scenes = [training_scene(rng) for _ in range(n)]
    return scenes, pixels_of([render_image(draw_scene(s, rng, size)) for s in scenes], size)


def test_the_registry_names_its_kinds_and_refuses_others():
    assert IMAGE_TOKENIZERS.names() == ["emu3", "janus", "multiscale", "palette", "patches", "vq"]
    with pytest.raises(ConfigError, match=r"model\.image_tokenizer\.kind: unknown image tokenizer 'vqgan'"):
        build_image_tokenizer(ImageTokenizerConfig(kind="vqgan"))
    with pytest.raises(ConfigError, match="not a multiple of downsample"):
        build_image_tokenizer(ImageTokenizerConfig(image_size=30, downsample=4))
    with pytest.raises(ConfigError, match="not a power of 2"):
        build_image_tokenizer(ImageTokenizerConfig(image_size=36, downsample=3))
    with pytest.raises(ConfigError, match="the palette tokenizer has 7 codes"):
        build_image_tokenizer(ImageTokenizerConfig(kind="palette"))


def test_pixels_round_trip_through_pil():
    _, pixels = _pictures(3, 32)
    assert pixels.shape == (3, 3, 32, 32) and pixels.min() >= -1 and pixels.max() <= 1
    assert torch.equal(pixels_of(images_of(pixels), 32), pixels)


def test_the_palette_code_is_exact_on_flat_colours_and_keeps_the_prompt():
    tok = build_image_tokenizer(ImageTokenizerConfig(kind="palette", image_size=64, downsample=1, codebook_size=7))
    scenes, pixels = _pictures(24, 64)
    codes = tok.encode(pixels)
    assert codes.shape == (24, 64, 64) and codes.dtype == torch.long and int(codes.max()) < 7
    out = tok.decode(codes)
    interior = (out - pixels).abs().amax(1) < 1e-6  # (B, H, W): every pixel not on an anti-aliased edge
    assert interior.float().mean() > 0.95
    assert torch.equal(tok.encode(out), codes)  # decoding then encoding changes no code
    assert all(check(s, im).ok for s, im in zip(scenes, images_of(out)))


def test_usage_counts_perplexity_and_the_share_in_use():
    codes = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3]])
    u = usage(codes, 8)
    assert u["used"] == 0.5 and u["dead"] == 4 and abs(u["perplexity"] - 4.0) < 1e-9
    assert usage(torch.zeros(10, dtype=torch.long), 8) == {"perplexity": 1.0, "used": 0.125, "dead": 7}
    same = torch.zeros(1, 3, 4, 4)
    assert psnr(same, same) == float("inf") and abs(psnr(same + 0.2, same) - 10 * torch.log10(torch.tensor(100.0))) < 1e-4


def test_vq_encodes_to_its_grid_and_learns_to_reconstruct():
    torch.manual_seed(0)
    config = ImageTokenizerConfig(image_size=32, downsample=4, codebook_size=64, code_dim=8, channels=16)
    tok = build_image_tokenizer(config)
    assert tok.grid == (8, 8)
    opt = torch.optim.AdamW(tok.parameters(), lr=3e-3)
    _, fixed = _pictures(16, 32, seed=1)
    before = psnr(tok(fixed).pixels, fixed)
    for step in range(60):
        _, batch = _pictures(16, 32, seed=100 + step)
        rec = tok(batch)
        assert rec.codes.shape == (16, 8, 8) and rec.pixels.shape == batch.shape
        opt.zero_grad()
        rec.loss.backward()
        opt.step()
    tok.eval()
    with torch.no_grad():
        codes = tok.encode(fixed)
        out = tok.decode(codes)
    assert torch.equal(codes, tok(fixed).codes)  # encode is the forward pass's code choice
    assert psnr(out, fixed) > before + 6, (before, psnr(out, fixed))
    assert usage(codes, 64)["used"] > 0.2


def test_encoding_leaves_the_codebook_as_it_is():
    torch.manual_seed(0)
    tok = build_image_tokenizer(ImageTokenizerConfig(image_size=16, downsample=4, codebook_size=16, code_dim=4,
                                                     channels=8))
    _, pixels = _pictures(4, 16)
    tok(pixels)  # k-means init and a first EMA update happen in training passes only
    state = {k: v.clone() for k, v in tok.state_dict().items()}
    tok.encode(pixels)
    tok.decode(tok.encode(pixels))
    assert all(torch.equal(state[k], v) for k, v in tok.state_dict().items())


def _tiny_janus():
    from transformers import JanusVQVAEConfig
    from transformers.models.janus.modeling_janus import JanusVQVAE

    return JanusVQVAE(JanusVQVAEConfig(embed_dim=8, num_embeddings=64, latent_channels=32, base_channels=32,
                                       channel_multiplier=[1, 2], num_res_blocks=1, num_patches=8, projection_dim=16,
                                       image_token_embed_dim=16))


def _tiny_emu3():
    from transformers import Emu3VQVAEConfig
    from transformers.models.emu3.modeling_emu3 import Emu3VQVAE

    return Emu3VQVAE(Emu3VQVAEConfig(embed_dim=4, codebook_size=64, base_channels=32, channel_multiplier=[1, 2],
                                     num_res_blocks=1, attn_resolutions=[], latent_channels=4, hidden_size=64,
                                     temporal_downsample_factor=2))


@pytest.mark.parametrize("kind, make", [("janus", _tiny_janus), ("emu3", _tiny_emu3)])
def test_a_pretrained_vq_model_gives_transformers_codes_and_pixels(kind, make, tmp_path):
    torch.manual_seed(0)
    theirs = make().eval()
    theirs.save_pretrained(tmp_path / kind)
    asked = ImageTokenizerConfig(kind=kind, hf=str(tmp_path / kind), image_size=16, downsample=4, codebook_size=512)
    ours = build_image_tokenizer(asked)
    assert asked.arch is None and asked.downsample == 4  # the caller's config is left as given
    assert (ours.config.downsample, ours.config.codebook_size, ours.config.image_size, ours.grid) == (2, 64, 16, (8, 8))
    _, pixels = _pictures(3, 16)
    with torch.no_grad():
        codes = ours.encode(pixels)
        out = ours.decode(codes)
        if kind == "janus":
            ref_codes = theirs.encode(pixels).image_tokens.view(3, 8, 8)
            ref_out = theirs.decode(ref_codes.flatten(1))
        else:
            ref_codes = torch.stack(theirs.encode(pixels, image_sizes=torch.tensor([[16, 16]] * 3)).image_tokens)
            ref_out = theirs.decode(ref_codes)
    assert codes.shape == (3, 8, 8) and torch.equal(codes, ref_codes)
    assert (out - ref_out).abs().max().item() == 0.0
    # rebuilt offline from the recorded architecture, with the weights of a checkpoint
    rebuilt = build_image_tokenizer(replace(ours.config, hf=None))
    rebuilt.load_state_dict(ours.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.encode(pixels), codes) and torch.equal(rebuilt.decode(codes), out)


def test_a_pretrained_kind_names_what_it_needs_and_refuses_the_wrong_model(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.image_tokenizer: kind 'janus' needs hf"):
        build_image_tokenizer(ImageTokenizerConfig(kind="janus"))
    _tiny_emu3().save_pretrained(tmp_path / "emu3")
    with pytest.raises(ConfigError, match=r"model\.image_tokenizer\.hf: .* is a 'emu3_vqgan' checkpoint"):
        build_image_tokenizer(ImageTokenizerConfig(kind="janus", hf=str(tmp_path / "emu3")))


def _grow_codebook(pictures, sync: bool = True, world: int = 1, scale: float = 1.0) -> torch.Tensor:
    """Three SGD steps of a tiny vq tokenizer on ``pictures(step)``; its codebook after them. Its k-means
    init sees too few vectors for its codes, so dead codes are re-seeded from the batch at every step."""
    import torch.distributed as dist

    torch.manual_seed(0)  # the same weights (and random generator) everywhere
    tok = build_image_tokenizer(ImageTokenizerConfig(image_size=16, downsample=4, codebook_size=16, code_dim=4,
                                                     channels=8))
    if not sync:  # the control: a codebook per process, as without the synchronisation
        from vector_quantize_pytorch.vector_quantize_pytorch import batched_sample_vectors

        book = tok.quantizer._codebook
        book.all_reduce_fn = book.kmeans_all_reduce_fn = lambda t: t
        book.sample_fn = book.replace_sample_fn = batched_sample_vectors
    opt = torch.optim.SGD(tok.parameters(), lr=0.01)
    for step in range(3):
        (tok(pictures(step)).loss * scale).backward()
        for p in tok.parameters():
            if p.grad is not None and world > 1:
                dist.all_reduce(p.grad)
        opt.step()
        opt.zero_grad()
    return tok.quantizer._codebook.embed.detach().clone()


def _codebook_worker(rank: int, world: int, port: int, out: str, sync: bool) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:  # each process sees its own pictures
        book = _grow_codebook(lambda step: _pictures(2, 16, seed=10 * step + rank)[1], sync, world)
        torch.save(book, f"{out}/{rank}.pt")
        dist.barrier()  # both results are on disk
    except BaseException:
        dist.destroy_process_group()
        raise
    # Done: leave without tearing gloo down. Its teardown, racing the other process's, aborted one
    # of them now and then under load ("terminate called without an active exception"), twice in
    # full runs beside other work, even after the barrier above.
    os._exit(0)


@pytest.mark.parametrize("sync", [True, False])
def test_the_vq_codebook_stays_one_codebook_across_processes(tmp_path, sync):
    """k-means init and every EMA update are all-reduced, so two processes that see different
    pictures end with the same codebook (the control without it ends with two)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_codebook_worker, args=(2, port, str(tmp_path), sync), nprocs=2, join=True)
    a, b = torch.load(tmp_path / "0.pt"), torch.load(tmp_path / "1.pt")
    assert torch.equal(a, b) == sync
    if sync:  # and it is the codebook one process grows on both processes' pictures (k-means seeds and
        # re-seeded dead codes drawn from the whole batch: ``image_tokenizers.sample_from_all``)
        torch.set_num_threads(1)
        both = lambda step: torch.cat([_pictures(2, 16, seed=10 * step + r)[1] for r in range(2)])  # noqa: E731
        torch.testing.assert_close(_grow_codebook(both, scale=2.0), a, rtol=1e-4, atol=1e-5)


def _whole_emu3(path):
    """A tiny ``Emu3ForConditionalGeneration`` (its VQ model is ``_tiny_emu3``'s), written to ``path``."""
    from transformers import Emu3Config, Emu3ForConditionalGeneration

    vq = _tiny_emu3().config.to_dict()
    text = dict(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    codes = {f"<|visual token {i:06d}|>": 100 + i for i in range(vq["codebook_size"])}
    config = Emu3Config(vq_config=vq, text_config=text, vocabulary_map={"<image>": 99, **codes})
    torch.manual_seed(0)
    model = Emu3ForConditionalGeneration(config).eval()
    model.save_pretrained(path, max_shard_size="100KB")  # several shards: only the VQ model's are read
    return model.model.vqmodel


@pytest.mark.parametrize("kind", ["janus", "emu3"])
def test_a_pretrained_kind_takes_the_vq_model_of_a_whole_checkpoint(kind, tmp_path):
    """``hf:`` may name the whole model a hub id holds (Janus-Pro, Emu3): the VQ model is built from its
    vq_config and given its weights, not freshly initialised ones."""
    if kind == "janus":
        from transformers import JanusForConditionalGeneration

        from hf_tiny import janus_checkpoint

        source = janus_checkpoint(tmp_path / "janus")
        theirs = JanusForConditionalGeneration.from_pretrained(source).eval().model.vqmodel
    else:
        source, theirs = tmp_path / "emu3", _whole_emu3(tmp_path / "emu3")
    ours = build_image_tokenizer(ImageTokenizerConfig(kind=kind, hf=str(source)))
    expected = theirs.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in ours.vq.state_dict().items())
    side = ours.config.image_size
    _, pixels = _pictures(2, side)
    with torch.no_grad():
        assert torch.equal(ours.decode(ours.encode(pixels)), ours.vq.decode(
            ours.encode(pixels).flatten(1) if kind == "janus" else ours.encode(pixels)))
    # the wrong kind is still refused by name
    other = "emu3" if kind == "janus" else "janus"
    with pytest.raises(ConfigError, match=rf"is a '{kind}' checkpoint"):
        build_image_tokenizer(ImageTokenizerConfig(kind=other, hf=str(source)))


def test_a_whole_checkpoint_without_the_vq_model_is_refused_by_name(tmp_path, monkeypatch):
    import json

    from fusionlm.image_tokenizers import JanusTokenizer
    from hf_tiny import janus_checkpoint

    source = janus_checkpoint(tmp_path / "janus")
    monkeypatch.setattr(JanusTokenizer, "whole", {"janus": ("model.nothing_here.",)})
    with pytest.raises(ConfigError, match=r"model\.image_tokenizer\.hf: .* does not hold the weights of its "
                                          r"vq_config under model\.nothing_here\. \(\d+ missing"):
        build_image_tokenizer(ImageTokenizerConfig(kind="janus", hf=str(source)))
    monkeypatch.undo()
    config = json.loads((source / "config.json").read_text())
    del config["vq_config"]
    (source / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match=r"model\.image_tokenizer\.hf: .* has no vq_config to build the part from"):
        build_image_tokenizer(ImageTokenizerConfig(kind="janus", hf=str(source)))
