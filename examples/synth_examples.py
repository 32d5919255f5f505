"""Draw docs/synth_examples.png: `shirg-hf synth` images at the high-res side and as the native view sees them.

Top row: the image as drawn (128 px, the evidence boxes of the question outlined in magenta); bottom row: the same
image after the processor's bicubic squash to the native 72 px. Both are enlarged with nearest-neighbour
resampling so every pixel stays visible. Each column is the first detail question of its kind in the test split.

    python examples/synth_examples.py                    # writes docs/synth_examples.png
    python examples/synth_examples.py --out /tmp/x.png --zoom 4
"""

import argparse
from pathlib import Path

import PIL.Image
import PIL.ImageDraw
import PIL.ImageFont

from shirg_hf import synth

# (family, answer glyphs) of each column
COLUMNS = (("tags", 1), ("tags", 2), ("chart", 2), ("form", 3))
EVIDENCE_COLOUR = (255, 0, 255)


def pick_samples(geometry: synth.Geometry, columns=COLUMNS, split: str = "test", seed: int = 0) -> list:
    """The first detail question of each (family, answer glyphs) in the split."""
    picked = []
    for family, glyphs in columns:
        index = 0
        while True:
            sample = synth.generate_sample(split, seed, index, geometry, families=(family,))
            if sample.row["question_type"] == "detail" and sample.row["answer_glyphs"] == glyphs:
                picked.append(sample)
                break
            index += 1
    return picked


def example_sheet(samples: list, geometry: synth.Geometry, zoom: int = 3) -> PIL.Image.Image:
    """One column per sample: high-res image (evidence outlined), native view, question and answer."""
    panel, gap, label_height, text_height = geometry.high_res_side * zoom, 16, 22, 64
    font = PIL.ImageFont.load_default(size=15)
    width = len(samples) * (panel + gap) + gap
    height = 2 * (panel + label_height) + text_height + 2 * gap
    sheet = PIL.Image.new("RGB", (width, height), "white")
    draw = PIL.ImageDraw.Draw(sheet)
    native_px = synth.native_glyph_height_px(1.0, geometry)
    glyph_px = synth.glyph_height_px(1.0)
    rows = (f"high-res {geometry.high_res_side} px (glyphs {glyph_px} px tall; evidence in magenta)",
            f"native view {geometry.native_side} px (glyphs {native_px:.1f} px tall)")
    for column, sample in enumerate(samples):
        x = gap + column * (panel + gap)
        high = sample.image.resize((panel, panel), PIL.Image.NEAREST)
        outline = PIL.ImageDraw.Draw(high)
        for x0, y0, x1, y1 in sample.row["evidence_boxes"]:
            outline.rectangle([x0 * zoom - 2, y0 * zoom - 2, x1 * zoom + 1, y1 * zoom + 1], outline=EVIDENCE_COLOUR,
                              width=2)
        native = sample.image.resize((geometry.native_side,) * 2, PIL.Image.BICUBIC)
        for row, picture in enumerate((high, native.resize((panel, panel), PIL.Image.NEAREST))):
            y = gap + row * (panel + label_height)
            draw.text((x, y), rows[row], fill="black", font=font)
            sheet.paste(picture, (x, y + label_height))
        y = gap + 2 * (panel + label_height)
        draw.text((x, y), f"Q: {sample.row['question']}", fill="black", font=font)
        draw.text((x, y + 22), f"A: {sample.row['answers'][0]}   ({sample.row['family']}, {sample.row['question_type']}, "
                  f"{sample.row['answer_glyphs']} glyphs)", fill="black", font=font)
    return sheet


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "docs" / "synth_examples.png"))
    parser.add_argument("--zoom", type=int, default=3, help="enlargement of both rows (default 3)")
    args = parser.parse_args(argv)
    geometry = synth.EVIDENCE_GEOMETRY
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example_sheet(pick_samples(geometry), geometry, args.zoom).save(out)
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
