"""The Gradio app over an `Explorer`: upload or generate an image, see the training images behind it.

    demo = build_explorer(store, dataset, pipe)        # a gr.Blocks, not launched
    launch_explorer(store, dataset, pipe)              # serve it (127.0.0.1:7860 by default)

Layout: "Attribute an image" (two store columns side by side: top-k gallery, table, score histogram,
downloads), "Generate (Journey-TRAK)" (sample from a prompt or seed with progress; a slider over the
sampling steps shows x̂0 and that step's top-k), "Generally influential" (training images in the top-k of
many of the queries made so far). Errors of the library (wrong image size, a store from another model,
an empty upload) are shown in the page as the library's message (`gr.Error`).
"""

from __future__ import annotations

import functools
import os
from typing import Any

import PIL.Image

from ..adapters import UnsupportedPipelineError
from .session import Explorer, escape_markdown

NO_STORE = "(none)"
MAX_UPLOAD = "10mb"  # gradio refuses larger uploads before they reach the app (launch's max_file_size)
CACHE_CLEANUP = (3600, 3600)  # gradio's temporary files of this app: checked every hour, removed after an hour
TABLE_HEADERS = ["rank", "index", "score", "caption"]
# Errors whose message is meant for the user: bad images, mismatched stores, missing files, unreadable uploads.
USER_ERRORS = (ValueError, FileNotFoundError, UnsupportedPipelineError, PIL.UnidentifiedImageError)


def import_gradio():
    """gradio, imported on first use with its usage analytics off unless the environment turned them on."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio
    except ImportError as error:
        raise ImportError("the explorer needs gradio: pip install 'diffusers-attribution[explore]'") from error
    return gradio


def _user_errors(function):
    """Raise the library's own message as a `gr.Error` (shown in the page; no stack trace)."""
    gr = import_gradio()

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except USER_ERRORS as error:
            raise gr.Error(f"{type(error).__name__}: {error}") from error

    return wrapper


def build_explorer(stores: Any, dataset: Any = None, pipe: Any = None, *, k: int = 5, title: str | None = None,
                   **explorer_kwargs):
    """The explorer app as a `gr.Blocks` (not launched). `stores`: an `Explorer`, or what `Explorer` takes
    together with `dataset` and `pipe`."""
    gr = import_gradio()
    explorer = stores if isinstance(stores, Explorer) else Explorer(stores, dataset, pipe, **explorer_kwargs)
    names = list(explorer.stores)
    n = len(explorer.data)

    def choices(session=None) -> list[str]:
        return explorer.names(session)

    def slot(column: int, name: str | None):
        """One store's column: which store, its top-k gallery, table, score histogram and downloads."""
        with gr.Column():
            dropdown = gr.Dropdown(choices() + ([NO_STORE] if column else []), value=name or NO_STORE,
                                   label=f"store {'AB'[column]}", elem_id=f"store-{'ab'[column]}")
            gallery = gr.Gallery(label="top-k training images", columns=5, height=240, format="png",
                                 object_fit="contain", elem_id=f"topk-{'ab'[column]}")
            table = gr.Dataframe(headers=TABLE_HEADERS, datatype=["number", "number", "number", "str"],
                                 interactive=False, label="top-k: training index, score, caption",
                                 elem_id=f"table-{'ab'[column]}")
            plot = gr.Plot(label="score distribution over the training set")
            files = gr.File(label="download: result.json, scores.csv, grid.png", file_count="multiple",
                            interactive=False)
        return dropdown, (gallery, table, plot, files)

    def store_outputs(image: Any, name: str, top: int, session, prompt: str | None = None) -> tuple:
        if name in (None, NO_STORE):
            return [], None, None, None
        result = explorer.attribute(image, name, prompts=prompt, session=session)
        scores = result.scores[0]
        files = explorer.export(result, name, top)
        return (explorer.gallery(scores, top), explorer.table(scores, top),
                explorer.score_plot(scores, top, name), [str(path) for path in files])

    @_user_errors
    def attribute(image, top, name_a, name_b, session):
        top = int(top)
        image = explorer.query_image(image)
        outputs = store_outputs(image, name_a, top, session) + store_outputs(image, name_b, top, session)
        against = ", ".join(escape_markdown(name) for name in (name_a, name_b) if name not in (None, NO_STORE))
        return (*outputs, f"Attributed a {image.size[0]}×{image.size[1]} image against {against}.",
                explorer.tile(explorer.query_tensor(image), 192))

    @_user_errors
    def add_store(spec, session):
        if not spec or not spec.strip():
            raise ValueError("enter a Hub dataset repo id or a folder under the explorer's store folder")
        name = explorer.add_visitor_store(spec, session)  # this visitor's session only
        return (gr.update(choices=choices(session)), gr.update(choices=choices(session) + [NO_STORE], value=name),
                gr.update(choices=choices(session)), gr.update(choices=choices(session)),
                f"Loaded {explorer.describe(name, session)}", session)

    def step_view(journey, step, top):
        if journey is None:
            return None, [], None
        step = int(step)
        scores = journey.scores[step]
        return explorer.tile(journey.query_images[step], 192), explorer.gallery(scores, int(top)), explorer.table(scores, int(top))

    @_user_errors
    def generate(prompt, seed, steps, name, top, session, progress=gr.Progress(track_tqdm=True)):
        seed, top = int(seed), int(top)
        if explorer.class_conditional:
            raise ValueError(f"{type(explorer.pipe).__name__} is class-conditional: Journey-TRAK sampling "
                             "(`attribute_trajectory`) takes a prompt or a seed, not a class label; upload its samples instead")
        prompt = (prompt or "").strip() if explorer.takes_prompt else None
        progress(0, desc="sampling and attributing every step")
        journey = explorer.trajectory(prompt if prompt is not None else seed, name, int(steps), seed=seed,
                                      session=session)
        final = journey.final_image
        result_outputs = store_outputs(final, name, top, session, prompt=prompt)
        last = len(journey.scores) - 1
        return (explorer.tile(final, 192), result_outputs[0], result_outputs[1], journey,
                gr.update(maximum=last, value=last), *step_view(journey, last, top),
                f"Sampled {len(journey.scores)} steps (seed {seed}"
                + (f", prompt {escape_markdown(repr(prompt))}" if prompt else "") + ").")

    @_user_errors
    def influence(name, top, share, session):
        result = explorer.general_influence(name, int(top), float(share), session=session)
        rows = [[int(index), float(result.frequency[index]), explorer.caption(int(index))] for index in result.indices]
        gallery = [(explorer.tile(explorer.data[index][0]), f"#{index}  {float(result.frequency[index]):.0%}")
                   for index, _, _ in rows]
        return (explorer.influence_plot(result, name, session), rows, gallery,
                f"{result.count} of {n} training images are in the top-{result.k} of more than {result.share:.0%} "
                f"of the {len(explorer._history(name, session))} queries attributed against {escape_markdown(name)}.")

    with gr.Blocks(title=title or "Attribution explorer", analytics_enabled=False, delete_cache=CACHE_CLEANUP) as demo:
        gr.Markdown(f"# {escape_markdown(title or 'Attribution explorer')}\nWhich training images made the model "
                    f"generate this image? {n} training examples; stores:\n\n"
                    + "\n".join(f"- {explorer.describe(name)}" for name in names))
        status = gr.Markdown(elem_id="status")
        session = gr.State(explorer.new_session())  # per visitor: the stores they add, and their queries
        with gr.Tab("Attribute an image"):
            with gr.Row():
                # image_mode=None: gradio passes the upload's path without decoding it (query_image checks it first)
                image = gr.Image(type="filepath", image_mode=None, label="query image",
                                 sources=["upload", "clipboard"], elem_id="query", height=256)
                seen = gr.Image(label="the query as the model sees it", interactive=False, format="png", height=256)
                with gr.Column():
                    top = gr.Slider(1, min(50, n), value=min(k, n), step=1, label="top-k")
                    run = gr.Button("Attribute", variant="primary", elem_id="attribute")
                    with gr.Row():
                        new_store = gr.Textbox(label="add a store (Hub dataset repo id, or a folder under the "
                                                     "explorer's store folder)", scale=3)
                        load = gr.Button("Load", scale=1)
            with gr.Row():
                pick_a, outputs_a = slot(0, names[0])
                pick_b, outputs_b = slot(1, names[1] if len(names) > 1 else None)
        with gr.Tab("Generate (Journey-TRAK)"):
            with gr.Row():
                with gr.Column():
                    prompt = gr.Textbox(label="prompt", visible=explorer.takes_prompt)
                    seed = gr.Number(0, precision=0, label="seed")
                    steps = gr.Slider(1, 200, value=20, step=1, label="sampling steps")
                    journey_store = gr.Dropdown(choices(), value=names[0], label="store (a kernel method)")
                    sample = gr.Button("Generate and attribute", variant="primary", elem_id="generate")
                with gr.Column():
                    final = gr.Image(label="generated image", interactive=False, format="png")
                    final_gallery = gr.Gallery(label="its top-k training images", columns=5, height=240, format="png")
                    final_table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="top-k of the generated image")
            journey = gr.State(None)
            step = gr.Slider(0, 1, value=0, step=1, label="sampling step (Journey-TRAK)", elem_id="step")
            with gr.Row():
                x0 = gr.Image(label="x̂0 at this step", interactive=False, format="png")
                with gr.Column():
                    step_gallery = gr.Gallery(label="this step's top-k", columns=5, height=240, format="png")
                    step_table = gr.Dataframe(headers=TABLE_HEADERS, interactive=False, label="this step's top-k")
        with gr.Tab("Generally influential"):
            gr.Markdown("Training images in the top-k of more than a share of the queries attributed so far "
                        "(uploads and generated images): a sign of timestep-induced bias (docs/methods).")
            with gr.Row():
                influence_store = gr.Dropdown(choices(), value=names[0], label="store")
                influence_k = gr.Slider(1, min(50, n), value=min(k, n), step=1, label="top-k")
                share = gr.Slider(0, 0.95, value=0.5, step=0.05, label="share of queries")
                diagnose = gr.Button("Diagnose")
            influence_plot = gr.Plot(label="top-k frequency of every training image")
            with gr.Row():
                influence_table = gr.Dataframe(headers=["index", "share of queries", "caption"], interactive=False)
                influence_gallery = gr.Gallery(label="generally influential images", columns=6, height=240, format="png")

        run.click(attribute, [image, top, pick_a, pick_b, session], [*outputs_a, *outputs_b, status, seen],
                  api_name="attribute")
        load.click(add_store, [new_store, session], [pick_a, pick_b, journey_store, influence_store, status, session],
                   api_name="add_store")
        sample.click(generate, [prompt, seed, steps, journey_store, top, session],
                     [final, final_gallery, final_table, journey, step, x0, step_gallery, step_table, status],
                     api_name="generate")
        step.change(step_view, [journey, step, top], [x0, step_gallery, step_table], api_name="step")
        diagnose.click(influence, [influence_store, influence_k, share, session],
                       [influence_plot, influence_table, influence_gallery, status], api_name="influence")
    demo.explorer = explorer
    return demo


def launch_explorer(stores: Any, dataset: Any = None, pipe: Any = None, *, host: str = "127.0.0.1", port: int | None = None,
                    share: bool = False, block: bool = True, k: int = 5, title: str | None = None,
                    max_file_size: str | int = MAX_UPLOAD, **explorer_kwargs):
    """Build the explorer and serve it on `host:port` (gradio's default port when None); `share=True` asks
    gradio for a public link (off by default: nothing leaves the machine). `block=False` returns at once.
    `max_file_size`: the largest upload gradio accepts; `store_root` (an `Explorer` option): the folder under which
    visitors may add local stores (default: none; Hub dataset repo ids always)."""
    demo = build_explorer(stores, dataset, pipe, k=k, title=title, **explorer_kwargs)
    demo.queue().launch(server_name=host, server_port=port, share=share, show_error=True, quiet=True,
                        prevent_thread_lock=not block, inbrowser=False, max_file_size=max_file_size)
    return demo
