"""`lora-db ui`: the DreamBooth workflow in a local web page (gradio), over lora_db.ui.page.

    lora-db ui --workspace ~/dreambooth          # then open http://127.0.0.1:7860

Tabs, left to right, follow a run: Photos (upload or pick a folder, captions), Train (the options, the memory
estimate, Start / Stop / Resume, progress, the loss and the validation images), Evaluate (`lora-db eval` of every
checkpoint), Sample (adapters at chosen weights, hot-swapped on one loaded model), Merge & export (and the model
card). A timer redraws the run's state from the workspace every second, so a reloaded page picks up where the run
is. The page listens on 127.0.0.1 unless --host says otherwise; there is no public share link.
"""

from __future__ import annotations

import html
import logging
import os
from pathlib import Path
from typing import Any

import gradio as gr
import pandas as pd

from lora_db.config.ui import UiConfig
from lora_db.ui import forms
from lora_db.ui.page import Page, TrainView

REFRESH_S = 1.0
MAX_PLOTTED = 2000  # loss points drawn; a longer run is thinned evenly
SAMPLER_SLOTS = 3
GPU_SIZES_GB = (4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 80, 96, 141)
CSS = """
.status { font-family: ui-monospace, monospace; white-space: pre-wrap; padding: 4px 0; }
.status.error { color: #b91c1c; }
#run-progress progress { width: 100%; height: 18px; }
"""
THEME = gr.themes.Default(font=["system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"])  # no web fonts


def status_html(text: str) -> str:
    kind = "status error" if text.startswith("error: ") else "status"
    return f'<div class="{kind}">{html.escape(text)}</div>'


def field_component(field: forms.PageField, start: Any = None):
    """The gradio input of one TrainConfig field: its help as the hint, its choices, its starting value."""
    value = field.start if start is None else start
    common = {"label": field.label, "info": field.help, "elem_id": f"field-{field.name}"}
    if field.kind == "bool":
        return gr.Checkbox(value=bool(value), **common)
    if field.kind == "choice":
        return gr.Dropdown(choices=list(field.choices), value=value, **common)
    if field.kind in ("int", "float"):
        return gr.Number(value=value, precision=0 if field.kind == "int" else None, **common)
    return gr.Textbox(value="" if value is None else str(value), **common)


def progress_html(view: TrainView) -> str:
    if view.output is None:
        return '<div id="run-progress"></div>'
    total = max(view.total, 1)
    loss = f", loss {view.losses[-1]:.4f}" if view.losses else ""
    saved = f", checkpoints at {', '.join(map(str, view.checkpoints))}" if view.checkpoints else ""
    return (
        f'<div id="run-progress"><progress value="{view.step}" max="{total}"></progress>'
        f"<div>step {view.step} of {view.total}{loss}{saved}</div></div>"
    )


def loss_frame(view: TrainView) -> pd.DataFrame:
    every = max(1, len(view.steps) // MAX_PLOTTED)
    return pd.DataFrame({"step": view.steps[::every], "loss": view.losses[::every]})


class Changed:
    """Send a component's value only when it changed since this page last got it (galleries would flicker)."""

    def __init__(self, seen: dict):
        self.seen = seen

    def __call__(self, key: str, value: Any, signature: Any = None) -> Any:
        signature = repr(value) if signature is None else signature
        if self.seen.get(key) == signature:
            return gr.skip()
        self.seen[key] = signature
        return value


def _stamps(paths) -> list:
    return [(str(p), p.stat().st_mtime_ns) for p in paths if p.exists()]


def build(page: Page) -> gr.Blocks:
    fields = forms.train_fields()
    by_name = {field.name: field for field in fields}
    # Uploads are copied into the workspace: gradio's own copies are deleted after a day.
    with gr.Blocks(title="lora-db", analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        seen = gr.State({})
        gr.Markdown(f"# lora-db: LoRA DreamBooth for UniDiffuser\nWorkspace: `{page.workspace.root}`")
        with gr.Tabs():
            with gr.Tab("1. Photos", id="photos"):
                photos_folder = gr.Textbox(
                    value=forms.STARTING_VALUES["instance_dir"],
                    label=forms.LABELS["instance_dir"],
                    info="A folder inside the workspace: uploads go here; training reads its photos and NAME.txt "
                    "captions.",
                    elem_id="photos-folder",
                )
                upload = gr.File(
                    file_count="multiple", file_types=["image"], label="Upload photos", elem_id="photo-upload"
                )
                load_photos = gr.Button("Show the folder's photos", elem_id="load-photos")
                photos_message = gr.HTML(elem_id="photos-message")
                photo_grid = gr.Gallery(
                    label="Photos", columns=6, height=260, object_fit="contain", elem_id="photo-grid"
                )
                caption_table = gr.Dataframe(
                    headers=["photo", "caption"],
                    column_count=2,
                    static_columns=[0],
                    interactive=True,
                    label="Captions (empty: the instance prompt)",
                    elem_id="captions",
                )
                save_captions = gr.Button("Save captions", elem_id="save-captions")

            with gr.Tab("2. Train", id="train"):
                inputs = {}
                with gr.Row():
                    for name in forms.MAIN_FIELDS[:5]:
                        inputs[name] = field_component(by_name[name])
                with gr.Row():
                    for name in forms.MAIN_FIELDS[5:11]:
                        inputs[name] = field_component(by_name[name])
                with gr.Row():
                    for name in forms.MAIN_FIELDS[11:]:
                        inputs[name] = field_component(by_name[name])
                with gr.Row():
                    gpu_memory = gr.Dropdown(
                        choices=[(f"{size} GB", size) for size in GPU_SIZES_GB],
                        value=8,
                        label="GPU memory (as cards are labelled: GiB)",
                        scale=1,
                        elem_id="gpu-memory",
                    )
                    estimate = gr.HTML(elem_id="estimate")
                with gr.Accordion("Advanced: every other option of lora-db train", open=False):
                    groups: dict[str, list[forms.PageField]] = {}
                    for field in fields:
                        if field.name not in forms.MAIN_FIELDS and field.name != "instance_dir":
                            groups.setdefault(field.group or "Other", []).append(field)
                    for group, members in groups.items():
                        gr.Markdown(f"**{group}**")
                        for start in range(0, len(members), 4):
                            with gr.Row():
                                for field in members[start : start + 4]:
                                    inputs[field.name] = field_component(field)
                with gr.Row():
                    start_button = gr.Button("Start", variant="primary", elem_id="start")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                    resume_button = gr.Button("Resume", elem_id="resume")
                train_message = gr.HTML(elem_id="train-message")
                train_status = gr.HTML(elem_id="train-status")
                train_progress = gr.HTML(elem_id="train-progress")
                with gr.Row():
                    loss_plot = gr.LinePlot(x="step", y="loss", title="loss", height=260, elem_id="loss-plot")
                    validation = gr.Gallery(
                        label="Validation images (newest first)",
                        columns=2,
                        height=260,
                        object_fit="contain",
                        elem_id="validation",
                    )
                with gr.Accordion("The command and its output", open=False):
                    train_command = gr.Code(label="command", language="shell", elem_id="train-command")
                    train_log = gr.Textbox(label="output", lines=12, max_lines=12, elem_id="train-log")

            with gr.Tab("3. Evaluate", id="evaluate"):
                gr.Markdown("`lora-db eval` of the run: every checkpoint and the final adapter against the photos.")
                with gr.Row():
                    eval_images = gr.Number(value=4, precision=0, label="Samples per prompt", elem_id="eval-images")
                    eval_steps = gr.Number(value=20, precision=0, label="Denoising steps", elem_id="eval-steps")
                    eval_button = gr.Button("Score checkpoints", variant="primary", elem_id="evaluate")
                eval_message = gr.HTML(elem_id="eval-message")
                eval_status = gr.HTML(elem_id="eval-status")
                with gr.Row():
                    eval_table = gr.Dataframe(label="Scores (best: the checkpoint eval picks)", elem_id="eval-table")
                    eval_plot = gr.Image(
                        label="Subject fidelity by step", type="filepath", height=420, elem_id="eval-plot"
                    )
                eval_log = gr.Textbox(label="output", lines=8, max_lines=8, elem_id="eval-log")

            with gr.Tab("4. Sample", id="sample"):
                gr.Markdown("Adapters at chosen weights on one loaded model: a new weight is a hot-swap, not a reload.")
                slots = []
                for number in range(SAMPLER_SLOTS):
                    with gr.Row():
                        adapter = gr.Dropdown(
                            choices=[], value=None, allow_custom_value=True, label=f"Adapter {number + 1}",
                            elem_id=f"adapter-{number}", scale=3,
                        )  # fmt: skip
                        weight = gr.Slider(-1.0, 2.0, value=1.0, step=0.05, label="weight", elem_id=f"weight-{number}")
                        slots += [adapter, weight]
                with gr.Row():
                    sample_prompt = gr.Textbox(
                        value=forms.STARTING_VALUES["instance_prompt"], label="Prompt", elem_id="sample-prompt", scale=3
                    )
                    sample_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="sample-seed")
                    sample_count = gr.Number(value=4, precision=0, label="Images", elem_id="sample-count")
                    sample_steps = gr.Number(value=20, precision=0, label="Denoising steps", elem_id="sample-steps")
                    sample_guidance = gr.Number(value=8.0, label="Guidance", elem_id="sample-guidance")
                with gr.Row():
                    refresh_adapters = gr.Button("Find adapters", elem_id="find-adapters")
                    sample_button = gr.Button("Generate", variant="primary", elem_id="generate")
                sample_message = gr.HTML(elem_id="sample-message")
                samples = gr.Gallery(label="Samples", columns=4, height=300, object_fit="contain", elem_id="samples")

            with gr.Tab("5. Merge & export", id="outputs"):
                with gr.Row():
                    merge_out = gr.Textbox(value="merged/sks-toy", label="Merged model folder", elem_id="merge-out")
                    merge_button = gr.Button("Merge into the base", elem_id="merge")
                with gr.Row():
                    export_out = gr.Textbox(value="exported/sks-toy", label="peft export folder", elem_id="export-out")
                    export_button = gr.Button("Export for peft", elem_id="export")
                outputs_message = gr.HTML(elem_id="outputs-message")
                outputs_status = gr.HTML(elem_id="outputs-status")
                outputs_log = gr.Textbox(label="output", lines=6, max_lines=6, elem_id="outputs-log")
                card = gr.Markdown(elem_id="model-card")

        names = list(inputs)
        values = [inputs[name] for name in names]

        def as_values(args) -> dict[str, Any]:
            return dict(zip(names, args, strict=True))

        # -- photos ---------------------------------------------------------------------------------------------

        def show_photos(folder):
            grid, rows = page.photo_view(folder)
            return [(str(path), caption) for path, caption in grid], rows or None

        def photos_signature(folder, grid) -> tuple:
            """What the timer compares to resend the photos and the caption table: the folder and its files' times."""
            return folder, _stamps(file for path, _ in grid for file in (Path(path), Path(path).with_suffix(".txt")))

        def shown(seen_now: dict, folder: str, grid) -> dict:
            """Record that this page already has the folder as it is now: the timer must not send the caption table
            again, over edits the user makes before saving (it did, a tick after an upload or a save)."""
            seen_now["photos"] = seen_now["captions"] = photos_signature(folder, grid)
            return seen_now

        def on_show(folder, seen_now):
            grid, rows = show_photos(folder)
            return grid, rows, shown(seen_now, folder, grid)

        def on_upload(folder, files, seen_now):
            message = page.upload(folder, files)
            return (status_html(message), None, *on_show(folder, seen_now))

        def on_save_captions(folder, table, seen_now):
            message = page.save_captions(folder, _rows(table))
            return status_html(message), shown(seen_now, folder, show_photos(folder)[0])

        upload.upload(
            on_upload, [photos_folder, upload, seen], [photos_message, upload, photo_grid, caption_table, seen]
        )
        load_photos.click(on_show, [photos_folder, seen], [photo_grid, caption_table, seen])
        save_captions.click(on_save_captions, [photos_folder, caption_table, seen], [photos_message, seen])

        # -- training -------------------------------------------------------------------------------------------

        def on_start(folder, *args):
            return status_html(page.start({**as_values(args), "instance_dir": folder}))

        def on_estimate(folder, memory, *args):
            return status_html(page.estimate({**as_values(args), "instance_dir": folder}, memory))

        start_button.click(on_start, [photos_folder, *values], train_message)
        stop_button.click(lambda: status_html(page.stop()), None, train_message)
        resume_button.click(lambda: status_html(page.resume()), None, train_message)
        # One listener for every memory option the user edits: a burst of edits is one estimate, of the last values.
        gr.on(
            [inputs[name].input for name in forms.MEMORY_FIELDS] + [gpu_memory.input],
            on_estimate,
            [photos_folder, gpu_memory, *values],
            estimate,
            trigger_mode="always_last",
        )

        def refresh(seen_now: dict, folder: str):
            changed = Changed(seen_now)
            grid, rows = show_photos(folder)
            view = page.train_view()
            validation_images = [(str(path), f"step {step}") for path, step in view.validation]
            eval_view, table = page.eval_view()
            outputs, model_card = page.outputs_view()
            photos = photos_signature(folder, grid)
            return (
                changed("photos", grid, photos),
                changed("captions", rows, photos),
                changed("status", status_html(view.status)),
                changed("progress", progress_html(view)),
                changed("loss", loss_frame(view), (str(view.output), len(view.steps), view.steps[-1:])),
                changed("validation", validation_images, _stamps(path for path, _ in view.validation)),
                changed("command", view.command),
                changed("log", "\n".join(view.log)),
                changed("eval-status", status_html(eval_view.status)),
                changed("eval-table", pd.DataFrame(table.rows, columns=table.header) if table else None),
                changed("eval-plot", str(table.plot) if table and table.plot else None),
                changed("eval-log", "\n".join(eval_view.log)),
                changed("outputs-status", status_html(outputs.status)),
                changed("outputs-log", "\n".join(outputs.log)),
                changed("card", model_card or ""),
                seen_now,
            )

        views = [
            photo_grid, caption_table, train_status, train_progress, loss_plot, validation, train_command, train_log,
            eval_status, eval_table, eval_plot, eval_log, outputs_status, outputs_log, card, seen,
        ]  # fmt: skip
        timer = gr.Timer(REFRESH_S)
        timer.tick(refresh, [seen, photos_folder], views, show_progress="hidden", queue=False)

        # -- evaluation, sampling, merge and export --------------------------------------------------------------

        eval_button.click(lambda n, s: status_html(page.evaluate(n, s)), [eval_images, eval_steps], eval_message)

        def adapter_lists():
            choices = page.adapter_choices()
            first = gr.update(choices=choices, value=choices[0] if choices else None)
            return first, *[gr.update(choices=choices) for _ in range(SAMPLER_SLOTS - 1)]

        refresh_adapters.click(adapter_lists, None, slots[0::2])

        def on_sample(model, prompt, seed, count, steps, guidance, *slot_values):
            pairs = list(zip(slot_values[0::2], slot_values[1::2], strict=True))
            images, note = page.sample(model, pairs, prompt, seed, count, steps, guidance)
            return [str(path) for path in images], status_html(note)

        sample_button.click(
            on_sample,
            [inputs["model"], sample_prompt, sample_seed, sample_count, sample_steps, sample_guidance, *slots],
            [samples, sample_message],
        )
        merge_button.click(lambda out: status_html(page.merge(out)), merge_out, outputs_message)
        export_button.click(lambda out: status_html(page.export(out)), export_out, outputs_message)

        # -- a (re)loaded page: the run's fields, its photos, the adapters, the estimate ------------------------

        def on_load(folder, *args):
            restored = page.restore()
            if restored is not None:
                folder = restored.get("instance_dir") or folder
                args = [
                    restored.get(name, arg) if name in restored else arg for name, arg in zip(names, args, strict=True)
                ]
                args = [", ".join(a) if isinstance(a, list) else a for a in args]
            return (folder, *args, *adapter_lists())

        demo.load(on_load, [photos_folder, *values], [photos_folder, *values, *slots[0::2]]).then(
            on_estimate, [photos_folder, gpu_memory, *values], estimate
        )
    return demo


def _rows(table) -> list[list[str]]:
    if table is None:
        return []
    if isinstance(table, pd.DataFrame):
        return table.astype(str).values.tolist()
    return [list(map(str, row)) for row in table]


def serve(config: UiConfig) -> None:
    """Serve the page until interrupted; the jobs it started keep running (and the next page finds them)."""
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # gradio's own requests to itself, one line each
    page = Page(Path(config.workspace))
    demo = build(page)
    demo.queue(default_concurrency_limit=1)
    print(f"lora-db ui: http://{config.host}:{config.port} (workspace {page.workspace.root})", flush=True)
    demo.launch(
        server_name=config.host,
        server_port=config.port,
        share=False,
        inbrowser=False,
        ssr_mode=False,
        allowed_paths=[str(page.workspace.root)],
        footer_links=[],
        quiet=True,
        theme=THEME,
        css=CSS,
    )
