"""`workbench generate --hf-dir DIR --image FILE [--page K]` on a tiny real PaliGemma 2 directory prints
transformers' greedy continuation, for a PNG of odd size with transparency, a JPEG and page 2 of a PDF;
bad inputs give one clear error line. The CLI's main runs in-process (one model load per call, no
interpreter start-up)."""

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers", reason="transformers (the dev extra) is not installed")

from conftest import make_hf_paligemma2_dir  # noqa: E402

from workbench.cli import main  # noqa: E402

PROMPT, N = "what is on the page?", 8


@pytest.fixture(scope="module")
def vlm_dir(tmp_path_factory):
    return make_hf_paligemma2_dir(tmp_path_factory.mktemp("hf-paligemma2"))


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """An RGBA PNG 37 x 53, an RGB JPEG 300 x 200, and a 2-page PDF whose pages are different pictures."""
    from PIL import Image

    d = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (53, 37, 4), dtype=np.uint8), "RGBA").save(d / "odd.png")
    Image.fromarray(rng.integers(0, 256, (200, 300, 3), dtype=np.uint8), "RGB").save(d / "photo.jpg", quality=90)
    pages = [Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8), "RGB") for _ in range(2)]
    pages[0].save(d / "doc.pdf", save_all=True, append_images=pages[1:])
    (d / "notes.txt").write_text("not an image\n")
    return d


def hf_greedy(directory, image) -> str:
    """transformers' processor + greedy generate on a PIL image, decoded without special tokens."""
    fast = transformers.PreTrainedTokenizerFast.from_pretrained(directory)
    image_proc = transformers.SiglipImageProcessorPil(size={"height": 28, "width": 28})
    image_proc.image_seq_length = 4
    proc = transformers.PaliGemmaProcessor(image_processor=image_proc, tokenizer=fast)
    model = transformers.PaliGemmaForConditionalGeneration.from_pretrained(directory, attn_implementation="eager")
    inputs = proc(images=image, text="<image>" + PROMPT, return_tensors="pt")
    inputs.pop("labels")
    with torch.no_grad():
        out = model.eval().generate(**inputs, max_new_tokens=N, do_sample=False)
    return fast.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def run_cli(capsys, *argv):
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def test_generate_prints_transformers_greedy_text_for_png_jpeg_and_a_pdf_page(vlm_dir, images, capsys):
    import pypdfium2 as pdfium
    from PIL import Image

    page2 = pdfium.PdfDocument(str(images / "doc.pdf"))[1].render(scale=2).to_pil()  # 144 dpi, our default
    cases = {"odd.png": (Image.open(images / "odd.png"), []), "photo.jpg": (Image.open(images / "photo.jpg"), []),
             "doc.pdf": (page2, ["--page", "2"])}
    texts = []
    for name, (image, extra) in cases.items():
        expected = hf_greedy(vlm_dir, image)
        rc, out, err = run_cli(capsys, "generate", "--hf-dir", str(vlm_dir), "--image", str(images / name), *extra,
                           "--prompt", PROMPT, "--max-new-tokens", str(N), "--temperature", "0")
        assert rc == 0, err
        assert out == expected + "\n", name
        texts.append(out)
    assert len(set(texts)) == 3  # the image matters: three pictures, three continuations
    assert all(len(t.strip()) > 3 for t in texts)


def test_generate_ckpt_run_folder_equals_the_hf_dir(vlm_dir, images, tmp_path, capsys):
    """--ckpt RUN_DIR of a paligemma2 run (a run folder holding the HF model's weights) prints the same text."""
    import dataclasses
    import shutil

    from conftest import DEBUG_TOML

    from workbench.checkpoint.hf import load_hf_dir
    from workbench.checkpoint.run import save_checkpoint
    from workbench.config import load_config, save_config
    from workbench.job import JobConfig

    model, _, section = load_hf_dir(vlm_dir)
    run = tmp_path / "run"
    run.mkdir()
    job = load_config(JobConfig, DEBUG_TOML, ["--data.vocab_size", str(section.config.vocab_size)])
    save_config(dataclasses.replace(job, model=section), run / "config.toml")
    shutil.copy(vlm_dir / "tokenizer.json", run / "tokenizer.json")
    save_checkpoint(run, 1, model.state_dict(), {"step": 1})
    outs = []
    for source in (["--ckpt", str(run)], ["--hf-dir", str(vlm_dir)]):
        rc, out, err = run_cli(capsys, "generate", *source, "--image", str(images / "photo.jpg"), "--prompt", PROMPT,
                               "--max-new-tokens", str(N))
        assert rc == 0, err
        outs.append(out)
    assert outs[0] == outs[1] and len(outs[0].strip()) > 3


def one_error(rc, err, *needles):
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    for n in needles:
        assert n in err, (n, err)


def test_bad_inputs_give_one_clear_error(vlm_dir, images, hf_llama_dir, capsys):
    gen = ("generate", "--hf-dir", str(vlm_dir), "--prompt", "x", "--max-new-tokens", "2")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "missing.png"))[::2], "missing.png", "not found")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "doc.pdf"), "--page", "3")[::2], "page 3", "2 pages")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "doc.pdf"), "--page", "0")[::2], "--page 0")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "notes.txt"))[::2], "notes.txt", "not an image")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "odd.png"), "--page", "2")[::2], "not a PDF")
    one_error(*run_cli(capsys, *gen)[::2], "vision-language model", "--image")
    one_error(*run_cli(capsys, *gen[:-2], "--page", "2")[::2], "--page K needs --image")
    for command in ("chat", "serve"):  # text-only commands refuse a VLM before any work
        one_error(*run_cli(capsys, command, "--hf-dir", str(vlm_dir))[::2], f"{command}: ", "vision-language model")
    llama = ("generate", "--hf-dir", str(hf_llama_dir), "--prompt", "x", "--image", str(images / "odd.png"))
    one_error(*run_cli(capsys, *llama)[::2], "--image needs a vision-language model", "llama3")


def test_the_image_is_checked_before_the_model_is_loaded(vlm_dir, images, capsys, monkeypatch):
    import workbench.checkpoint.load as load

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before the image was checked")

    monkeypatch.setattr(load, "load_for_inference", no_load)
    gen = ("generate", "--hf-dir", str(vlm_dir), "--prompt", "x")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "missing.png"))[::2], "missing.png", "not found")
    one_error(*run_cli(capsys, *gen, "--image", str(images / "doc.pdf"), "--page", "3")[::2], "page 3", "2 pages")


def test_load_image_exif_orientation_decompression_bombs_and_pdf_headers(images, tmp_path, monkeypatch):
    from PIL import Image

    from workbench.errors import DataError
    from workbench.inference.vlm import load_image

    pixels = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)  # 30 wide, 20 high
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: the camera was turned; shown rotated 90 degrees clockwise
    Image.fromarray(pixels).save(tmp_path / "turned.png", exif=exif)
    got = np.asarray(load_image(tmp_path / "turned.png"))
    assert got.shape == (30, 20, 3) and np.array_equal(got, np.rot90(pixels, k=-1))  # upright, as transformers
    assert np.array_equal(np.asarray(load_image(images / "odd.png")).shape, (53, 37, 3))  # no tag: unchanged
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL refuses images over 2x this many pixels
    with pytest.raises(DataError, match="photo.jpg: too large to decode safely"):
        load_image(images / "photo.jpg")
    monkeypatch.undo()
    # a PDF whose header follows some bytes of junk (readers accept it within the first 1024 bytes)
    (tmp_path / "junk.pdf").write_bytes(b"\x00junk before the header\n" * 20 + (images / "doc.pdf").read_bytes())
    want = np.asarray(load_image(images / "doc.pdf", page=2))
    assert np.array_equal(np.asarray(load_image(tmp_path / "junk.pdf", page=2)), want)

