"""X-VILA demo.

    python app.py [--host 127.0.0.1] [--port 7860] [--share]

The chat itself needs the model core and the decoders, which are not built yet: this page
says so, and meanwhile checks media files the way the chat will read them (the same
decoders, limits and error messages). UI code only: everything it does goes through
`xvila`'s public modules, and nothing is loaded at import time.
"""

from __future__ import annotations

import argparse
import os

# Gradio phones home (analytics, version checks) unless told not to; the demo must start
# the same with or without a network.
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import gradio as gr  # noqa: E402

from xvila import media  # noqa: E402

STATUS = """# X-VILA
**Any-to-any chat over text, image, video and audio — work in progress.**

The model parts (the LLM with generation tokens, projections, decoders and the visual
embedding highway) are not built yet, so there is no chat on this page. What works today:
reading media exactly as the chat will, with the same limits and error messages. Try a
file below — a broken or unsupported one gets a plain explanation, and the page keeps
serving.
"""


def describe(path: str | None) -> str:
    """One line per fact about an uploaded file, or the reason it cannot be used."""
    if not path:
        return "Upload an image, a video or an audio file."
    name = os.path.basename(path)
    try:
        kind = media.media_kind(path)
        if kind == "image":
            image = media.read_image(path)
            return f"**{name}**: image, {image.width}×{image.height} pixels."
        if kind == "video":
            info = media.probe_video(path)
            sound = "with" if info.has_audio else "without"
            return (f"**{name}**: video, {info.width}×{info.height}, {info.duration:.2f} s at "
                    f"{info.fps:.2f} fps, {sound} an audio track.")
        audio = media.read_audio(path)
        note = " It is silent." if audio.silent else ""
        return (f"**{name}**: audio, {audio.duration:.2f} s, {audio.sample_rate} Hz, "
                f"{audio.samples.shape[0]} channel(s).{note}")
    except media.MediaError as err:
        return f"⚠️ {err}"


def build() -> gr.Blocks:
    with gr.Blocks(title="X-VILA") as demo:
        gr.Markdown(STATUS)
        with gr.Row():
            upload = gr.File(label="Image, video or audio", type="filepath")
            report = gr.Markdown()
        upload.change(describe, inputs=upload, outputs=report, api_name="describe")
    return demo


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--share", action="store_true", help="also serve through a public gradio.live link")
    args = parser.parse_args(argv)
    build().queue(default_concurrency_limit=2).launch(
        server_name=args.host, server_port=args.port, share=args.share, max_file_size="200mb"
    )


if __name__ == "__main__":
    main()
