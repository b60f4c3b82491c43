"""A story's batches when they are not the host's own slices (issue 24; ``story/batches.py`` plans them).

Host contract (A1111 1.10, Forge and Forge Neo ``process_images_inner``; hosts.md §1.2): for ``n in
range(p.n_iter)`` the host slices ``p.all_prompts``, ``all_negative_prompts``, ``all_seeds`` and ``all_subseeds`` at
``n * p.batch_size`` into ``p.prompts``/``negative_prompts``/``seeds``/``subseeds``, builds ``p.rng`` from those
seeds, then calls ``before_process_batch``; ``parse_extra_network_prompts`` parses ``p.prompts`` (txt2img with hires
also slices ``all_hr_prompts``/``all_hr_negative_prompts`` the same way) and the networks of ``p.prompts[0]`` are
activated; then ``process_batch``, ``setup_conds`` (from ``p.prompts`` / ``p.hr_prompts``) and ``p.sample``; after
``postprocess_batch`` it slices ``p.prompts``/``negative_prompts`` again, calls ``postprocess_batch_list``, and each
image's infotext, file and place in the output list come from ``p.prompts[i]``/``p.seeds[i]``. So a batch is what
those per-batch lists say; ``p.batch_size`` only positions the slices (and is the grid's column count).

A story whose frames name different extra networks is drawn in batches of one network set each, of uneven sizes and
not in story order. ``p.n_iter`` is the number of batches and ``p.batch_size`` the largest; ``p.all_*`` stay in
story order (``Processed.all_prompts``/``all_seeds`` and the API's info list the frames in story order); each batch's
lists are replaced by its frames' entries, with nothing padded:
- ``before_process_batch``: prompts, negative prompts, seeds, subseeds, and ``p.rng`` built again from those seeds
  (the host's own constructor and arguments);
- ``process_batch`` (after the networks are parsed, before ``setup_conds``): the hires prompts and their networks;
- ``postprocess_batch_list`` (after the host's second slicing): prompts and negative prompts, which the images'
  infotexts and file names take;
- ``p.sample`` (img2img): tensors the host made for ``p.batch_size`` rows (``init_latent``, ``image_conditioning``
  of the one init image a story of several batches can have) are cut to the batch's rows (``batch_rows``).
Plain stories (every frame the same networks) are the host's slices: nothing here runs for them.

Story order of the results, when the batches are not drawn in story order: ``before_process`` sets
``p.do_not_save_samples`` and ``p.do_not_save_grid`` so the host saves nothing as it draws (its files would be
numbered in drawing order), and ``restore_story_order`` (first thing in ``postprocess``) puts ``processed.images``
and ``processed.infotexts`` back in story order, saves the frames in that order as the host would have (same
``images.save_image`` call, file name tokens of each frame's own position), builds the grid from them, and gives
``p`` its flags back. The host's extra files (before face restoration / colour correction, inpainting masks) are
not written for such a story.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch

from modules import extra_networks, images, processing, rng, shared

from ..story.batches import story_order
from ..story.run import StoryRunPlan


@dataclass
class DeferredSaving:
    """The ``p`` flags ``before_process`` changed, and the frames whose images the host made, in drawing order."""
    do_not_save_samples: bool
    do_not_save_grid: bool
    drawn: list[int] = field(default_factory=list)


def defer_saving(p, plan: StoryRunPlan) -> DeferredSaving | None:
    """From ``before_process``: the host saves nothing while drawing batches out of story order."""
    if plan.in_story_order:
        return None
    deferred = DeferredSaving(bool(getattr(p, "do_not_save_samples", False)),
                              bool(getattr(p, "do_not_save_grid", False)))
    p.do_not_save_samples, p.do_not_save_grid = True, True
    return deferred


def _take(values, frames) -> list:
    return [values[f] for f in frames]


def before_process_batch(p, plan: StoryRunPlan) -> None:
    """This batch's prompts, seeds and noise generator: its frames', not the host's slice."""
    if plan.host_slices or p.iteration >= plan.batch_count:
        return
    frames = plan.batch_frames(p.iteration)
    p.prompts, p.negative_prompts = _take(p.all_prompts, frames), _take(p.all_negative_prompts, frames)
    p.seeds, p.subseeds = _take(p.all_seeds, frames), _take(p.all_subseeds, frames)
    made = p.rng
    p.rng = rng.ImageRNG(made.shape, p.seeds, subseeds=p.subseeds, subseed_strength=p.subseed_strength,
                         seed_resize_from_h=p.seed_resize_from_h, seed_resize_from_w=p.seed_resize_from_w)


def process_batch(p, plan: StoryRunPlan) -> None:
    """txt2img with hires: this batch's hires prompts and networks (``parse_extra_network_prompts`` sliced them)."""
    if plan.host_slices or not getattr(p, "enable_hr", False) or getattr(p, "all_hr_prompts", None) is None:
        return
    frames = plan.batch_frames(p.iteration)
    p.hr_negative_prompts = _take(p.all_hr_negative_prompts, frames)
    p.hr_prompts, p.hr_extra_network_data = extra_networks.parse_prompts(_take(p.all_hr_prompts, frames))


def postprocess_batch_list(p, plan: StoryRunPlan, deferred: DeferredSaving | None) -> None:
    """The prompts the host sliced again before the images' infotexts and files (its next step makes them)."""
    if plan.host_slices:
        return
    frames = plan.batch_frames(p.iteration)
    p.prompts, p.negative_prompts = _take(p.all_prompts, frames), _take(p.all_negative_prompts, frames)
    if deferred is not None:
        deferred.drawn += frames


ROW_TENSORS = ("init_latent", "image_conditioning")  # img2img: made once per job for p.batch_size rows


@contextlib.contextmanager
def batch_rows(p, plan: StoryRunPlan) -> Iterator[None]:
    """Around ``p.sample``: the job's per-row tensors cut to this batch's rows, given back afterwards. A story of
    several batches has one init image (the host refuses more than ``batch_size``, and fewer change the batch size,
    which ``check_host_prompts`` refuses), so every row is the same image."""
    rows, saved = len(plan.batch_frames(p.iteration)), {}
    for name in ROW_TENSORS:
        value = getattr(p, name, None)
        if isinstance(value, torch.Tensor) and value.ndim == 4 and value.shape[0] == p.batch_size > rows:
            saved[name] = value
            setattr(p, name, value[:rows])
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(p, name, value)


def restore_story_order(p, plan: StoryRunPlan, processed, deferred: DeferredSaving | None) -> None:
    """From ``postprocess``: images and infotexts in story order; the frames and the grid saved in that order."""
    if deferred is None:
        return
    p.do_not_save_samples, p.do_not_save_grid = deferred.do_not_save_samples, deferred.do_not_save_grid
    first, order = processed.index_of_first_image, deferred.drawn
    end = first + len(order)  # the frames' images; other scripts' images may follow
    if len(processed.images) < end or len(processed.infotexts) < end:
        print("Consistent Story: the job returned fewer images than it drew frames (masks or other images among "
              "them?); the frames stay in drawing order and unsaved")
        return
    ranks = story_order(order)
    frames = [order[k] for k in ranks]
    processed.images[first:end] = [processed.images[first + k] for k in ranks]
    processed.infotexts[first:end] = [processed.infotexts[first + k] for k in ranks]
    processed.info = processed.infotexts[0]
    opts, state = shared.opts, shared.state
    if opts.samples_save and not p.do_not_save_samples and \
            (opts.save_incomplete_images or not (state.interrupted or state.skipped)):
        iteration, index = p.iteration, getattr(p, "batch_index", 0)
        try:
            for frame, image, info in zip(frames, processed.images[first:end], processed.infotexts[first:end]):
                p.iteration, p.batch_index = divmod(frame, p.batch_size)  # [generation_number] = frame + 1
                images.save_image(image, p.outpath_samples, "", p.all_seeds[frame], p.all_prompts[frame],
                                  opts.samples_format, info=info, p=p)
        finally:
            p.iteration, p.batch_index = iteration, index
    _story_order_grid(p, processed, first, end)


def _story_order_grid(p, processed, first: int, end: int) -> None:
    """The host's grid (``process_images_inner``) from the frames in story order; one it made is replaced."""
    opts, frames = shared.opts, processed.images[first:end]
    if not (opts.return_grid or opts.grid_save) or p.do_not_save_grid or \
            (len(frames) < 2 and opts.grid_only_if_multiple):
        return
    grid = images.image_grid(frames, p.batch_size)
    text = processing.create_infotext(p, p.all_prompts, p.all_seeds, p.all_subseeds, use_main_prompt=True,
                                      index=0, all_negative_prompts=p.all_negative_prompts)
    if opts.return_grid:
        if opts.enable_pnginfo:
            grid.info["parameters"] = text
        if first:
            processed.images[0], processed.infotexts[0] = grid, text
        else:
            processed.images.insert(0, grid)
            processed.infotexts.insert(0, text)
            processed.index_of_first_image = 1
        processed.info = processed.infotexts[0]
    if opts.grid_save:
        images.save_image(grid, p.outpath_grids, "grid", p.all_seeds[0], p.all_prompts[0], opts.grid_format,
                          info=text, short_filename=not opts.grid_extended_filename, p=p, grid=True)
