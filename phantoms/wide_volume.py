"""Profile "wide": one case in memory, from the same anatomy and trees as the default, more varied.

Rendered on a finer internal z grid (wide.py), with fissures, emphysema and fibrosis
(parenchyma.py), the default's vessel and airway trees, the wide nodule kinds (wide_nodules.py),
then integrated to the written slices and passed through the wide imaging chain (artifacts.py).
"""

from __future__ import annotations

import numpy as np

from ctlesion_phantoms import artifacts, parenchyma, wide
from ctlesion_phantoms.config import PhantomConfig
from ctlesion_phantoms.truth import CaseTruth
from ctlesion_phantoms.tubes import Grid
from ctlesion_phantoms.uids import CaseIdentity
from ctlesion_phantoms.volume import PhantomVolume, _Frame, _render_anatomy, draw_tubes
from ctlesion_phantoms.wide_nodules import place_wide_nodules

WIDE_GENERATOR_VERSION = "ctlesion-phantoms 1 wide 1"


def generate_wide_volume(seed: int, config: PhantomConfig, case_id: str) -> PhantomVolume:
    streams = [np.random.default_rng(s) for s in np.random.SeedSequence([seed, 0x57DE]).spawn(9)]
    r_case, r_tree, r_nod, r_draw, r_air, r_tex, r_paren, r_art, r_noise = streams
    case = wide.sample_case(r_case, config)
    scan, params, internal, placement = case.scan, case.params, case.internal, case.placement
    pixel = scan.pixel_spacing
    frame = _Frame(internal, placement)
    fissures: list[parenchyma.Fissure] = []
    posterior: list[np.ndarray] = []

    def decorate(renderer: object) -> object:
        fissures.extend(parenchyma.sample_fissures(r_tex, params, renderer.x, renderer.y, pixel))  # type: ignore[attr-defined]
        posterior.append(renderer.y > 0)  # type: ignore[attr-defined]
        return lambda sl, lung_k, z: parenchyma.draw_fissures(sl, lung_k, z, fissures, internal.slice_spacing)

    vol, lung = _render_anatomy(params, internal, placement, decorate=decorate)
    grid = Grid(shape=vol.shape, spacing=(internal.slice_spacing, pixel, pixel), soft=0.5 * pixel)
    paren = parenchyma.sample_parenchyma(r_paren, fissures)
    if paren.emphysema != "none" or paren.fibrosis:
        dist = parenchyma.coarse_pleural_distance(lung, grid)
        parenchyma.draw_emphysema(r_paren, vol, lung, grid, dist, paren.emphysema)
        if paren.fibrosis:
            parenchyma.draw_fibrosis(r_paren, vol, lung, grid, dist, posterior[0])
    # thick slices are integrated from the internal grid: tubes need no z shrink beyond its own step
    z_shrink = max(0.0, (internal.slice_spacing - 1.0) / 4.0)
    vessels, airways = draw_tubes(r_tree, r_air, config, params, frame, vol, lung, grid, z_shrink)
    z0_body = internal.origin[2] - placement.offset[2]
    sampler = parenchyma.fissure_point_sampler(fissures, lung, grid, -z0_body)
    nodules = place_wide_nodules(r_nod, r_draw, config, vol, lung, grid, vessels, airways, internal, case.geometry, placement, sampler)  # type: ignore[arg-type]

    geometry = case.geometry
    lung_out = lung[case.z_margin :: case.z_step][: geometry.slices].copy()
    vol = wide.integrate_slices(vol, case)
    del lung
    z_body = geometry.origin[2] + np.arange(geometry.slices) * geometry.slice_spacing - placement.offset[2]
    artifacts.motion(vol, scan, z_body, params.lung_height, pixel)
    artifacts.kernel(vol, scan, pixel)
    artifacts.streaks(vol, r_art, scan, pixel)
    overlap = max(1, int(round(geometry.slice_thickness / geometry.slice_spacing)))
    artifacts.noise(vol, r_noise, scan, pixel, overlap)
    np.clip(vol, -1024.0, 3071.0, out=vol)
    outside = artifacts.reconstruction_circle(vol.shape[1:], scan)
    if outside is not None:
        vol[:, outside] = scan.padding_hu if scan.padding_hu is not None else -1024.0
    vessels = vessels.copy()
    vessels[:, [0, 3]] -= case.z_margin * internal.slice_spacing  # internal -> output grid mm
    identity = CaseIdentity.for_seed(seed, case_id)
    scanner = scan.to_dict()
    scanner.update(paren.to_dict())
    scanner["internal_slice_spacing"] = round(internal.slice_spacing, 4)
    truth = CaseTruth(
        case_id=case_id,
        seed=seed,
        geometry=geometry,
        nodules=nodules,
        study_instance_uid=identity.study_uid,
        series_instance_uid=identity.series_uid,
        frame_of_reference_uid=identity.frame_of_reference_uid,
        noise_hu=round(scan.noise_hu, 2),
        psf_sigma_mm=round(scan.psf_sigma_mm, 3),
        generator_version=WIDE_GENERATOR_VERSION,
        profile="wide",
        scanner=scanner,
    )
    return PhantomVolume(hu=vol, lung_mask=lung_out, truth=truth, vessels=vessels, outside=outside)
