"""Channel statistics, detection rules, channel sets, stability, AdaLN alignment and scan reports."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditf.errors import InvalidArgumentError
from ditf.massive.detect import (
    RatioRule,
    SunRule,
    TopKRule,
    adaln_alignment,
    bottom_k_channels,
    detect_ratio,
    detect_sun,
    detect_table,
    detect_top_k,
    jaccard,
    jaccard_across_blocks,
    jaccard_across_runs,
    jaccard_across_steps,
    jaccard_matrix,
    magnitude_matched_channels,
    mean_pairwise_jaccard,
    random_k_channels,
    sun_massive_entries,
    top_k_channels,
)
from ditf.massive.report import build_scan_report, render_markdown, write_scan_figures, write_scan_report
from ditf.massive.stats_files import load_stats_table, save_stats_table
from ditf.massive.stats import (
    ChannelStats,
    StatsTable,
    channel_stats,
    depth_profile,
    merge_channel_stats,
    merge_stats_tables,
    step_profile,
)

FIXTURE = Path(__file__).parent / "fixtures" / "flux_tiny" / "flux_tiny_case.safetensors"
INJECTED = [11, 42]


def activations_with_massive_channels(seed: int = 0, tokens: int = 256, channels: int = 64) -> torch.Tensor:
    """Gaussian activations (N, C) with channel 11 near +400 and channel 42 near -250 on every token."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, channels, generator=generator)
    x[:, 11] += 400.0
    x[:, 42] -= 250.0
    return x


@pytest.fixture(scope="module")
def flux_tiny_blocks() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE)


def tokens_of(raw: torch.Tensor) -> torch.Tensor:
    """(C, h, w) feature map -> (N, C) tokens, row-major."""
    return raw.flatten(1).T


# --- statistics -----------------------------------------------------------------------------


def test_channel_stats_equal_hand_written_formulas():
    x = torch.randn(2, 50, 8)
    magnitude = x.reshape(100, 8).abs()
    ordered = magnitude.sort(dim=0).values

    stats = channel_stats(x)

    assert torch.allclose(stats.mean_abs, magnitude.sum(0) / 100)
    assert torch.allclose(stats.abs_mean, (x.reshape(100, 8).sum(0) / 100).abs(), atol=1e-6)
    assert torch.equal(stats.max_abs, ordered[-1])
    assert torch.equal(stats.median_abs, ordered[49])  # lower middle of 100 values (rank 50)
    assert torch.equal(stats.p999_abs, ordered[99])  # ceil(0.999 * 100) = 100th smallest
    assert stats.median_all == magnitude.flatten().sort().values[399].item()  # lower middle of 800
    per_channel_median = ordered[49]
    assert torch.allclose(stats.ratio_to_median, per_channel_median / per_channel_median.sort().values[3])
    assert stats.n_tokens == 100


def test_channel_stats_of_bfloat16_input_are_fp32():
    stats = channel_stats(torch.randn(16, 4).bfloat16())
    assert stats.mean_abs.dtype == torch.float32


@pytest.mark.parametrize("shape", [(5,), (2, 3, 4, 5), (0, 4)])
def test_channel_stats_rejects_shapes_that_are_not_tokens_by_channels(shape):
    with pytest.raises(InvalidArgumentError, match=r"\(B, N, C\) or \(N, C\)"):
        channel_stats(torch.zeros(shape))


def test_merge_weights_means_by_tokens_and_keeps_the_maximum():
    first, second = torch.randn(30, 6), torch.randn(10, 6) * 5
    merged = merge_channel_stats([channel_stats(first), channel_stats(second)])
    together = channel_stats(torch.cat([first, second]))

    assert torch.allclose(merged.mean_abs, together.mean_abs, atol=1e-6)
    assert torch.allclose(merged.mean, together.mean, atol=1e-6)
    assert torch.equal(merged.max_abs, together.max_abs)
    expected_median = (30 * channel_stats(first).median_abs + 10 * channel_stats(second).median_abs) / 40
    assert torch.allclose(merged.median_abs, expected_median)  # documented approximation
    assert (merged.n_tokens, merged.n_calls) == (40, 2)


def test_merge_is_associative():
    parts = [channel_stats(torch.randn(n, 4)) for n in (7, 11, 13)]
    stepwise = merge_channel_stats([merge_channel_stats(parts[:2]), parts[2]])
    at_once = merge_channel_stats(parts)
    assert torch.allclose(stepwise.median_abs, at_once.median_abs)
    assert torch.allclose(stepwise.mean_abs, at_once.mean_abs)


def test_merge_refuses_different_widths():
    with pytest.raises(InvalidArgumentError, match="different widths"):
        merge_channel_stats([channel_stats(torch.randn(4, 3)), channel_stats(torch.randn(4, 5))])


def test_channel_stats_round_trip_through_json():
    stats = channel_stats(torch.randn(20, 6))
    again = ChannelStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    for name in ("mean_abs", "mean", "max_abs", "median_abs", "p999_abs"):
        assert torch.equal(getattr(again, name), getattr(stats, name))
    assert (again.median_all, again.n_tokens) == (stats.median_all, stats.n_tokens)


def test_channel_stats_from_dict_names_the_missing_field():
    data = channel_stats(torch.randn(4, 3)).to_dict()
    del data["max_abs"]
    with pytest.raises(InvalidArgumentError, match="max_abs"):
        ChannelStats.from_dict(data)


def small_table() -> StatsTable:
    table = StatsTable(timesteps={0: 1000.0, 1: 500.0}, meta={"model": "synthetic"})
    for block in (0, 1, 2):
        for step in (0, 1):
            table.add(block, step, channel_stats(activations_with_massive_channels(seed=block * 10 + step, tokens=64)))
    return table


def test_stats_table_stacks_blocks_by_steps_by_channels():
    table = small_table()
    stacked = table.stack("mean_abs")
    assert stacked.shape == (3, 2, 64)
    assert torch.equal(stacked[2, 1], table[(2, 1)].mean_abs)
    assert table.stack("median_all").shape == (3, 2)


def test_stats_table_select_and_unknown_cells():
    table = small_table()
    assert table.select(blocks=[1], steps=[0]).blocks == [1]
    with pytest.raises(InvalidArgumentError, match=r"blocks \[7\] are not in this table"):
        table.select(blocks=[7])
    with pytest.raises(InvalidArgumentError, match=r"no statistics for block 5, step 0; recorded blocks \[0, 1, 2\]"):
        table[(5, 0)]


def test_stats_table_add_merges_a_second_call_into_the_cell():
    table = StatsTable()
    table.add(0, 0, channel_stats(torch.randn(8, 4)))
    table.add(0, 0, channel_stats(torch.randn(8, 4)))
    assert table[(0, 0)].n_calls == 2 and table[(0, 0)].n_tokens == 16


def test_stats_table_round_trips_through_a_json_index_and_binary_vectors(tmp_path):
    table = small_table()
    path = save_stats_table(table, tmp_path / "stats.json")
    again = load_stats_table(path)
    assert again.blocks == table.blocks and again.timesteps == table.timesteps and again.meta == table.meta
    for name in ("mean_abs", "max_abs", "median_abs", "p999_abs", "median_all"):
        assert torch.equal(again.stack(name), table.stack(name))
    assert all(torch.equal(again[cell].mean, stats.mean) for cell, stats in table.items())
    index = json.loads(path.read_text())
    assert index["arrays"] == "stats.safetensors" and len(index["cells"]) == len(table)
    assert set(index["cells"][0]) == {"block", "step", "row", "median_all", "n_tokens", "n_calls"}
    assert path.stat().st_size < 2000  # the index only: the 6 x 5 x 64 values are 4 bytes each in the binary file
    vectors = load_file(tmp_path / "stats.safetensors")
    assert vectors["mean_abs"].shape == (len(table), 64) and vectors["mean"].dtype == torch.float32
    assert load_stats_table(tmp_path).blocks == table.blocks  # a scan folder works too


def test_stats_json_without_its_vectors_file_is_refused(tmp_path):
    save_stats_table(small_table(), tmp_path / "stats.json")
    (tmp_path / "stats.safetensors").unlink()
    with pytest.raises(InvalidArgumentError, match="keeps its vectors in stats.safetensors, which is missing"):
        load_stats_table(tmp_path / "stats.json")


def test_an_all_json_table_of_the_first_format_still_loads(tmp_path):
    table = small_table()
    (tmp_path / "old.json").write_text(json.dumps(table.to_dict()))
    assert torch.equal(load_stats_table(tmp_path / "old.json").stack("mean_abs"), table.stack("mean_abs"))


def test_merge_stats_tables_merges_cell_by_cell():
    merged = merge_stats_tables([small_table(), small_table()])
    assert merged[(1, 1)].n_calls == 2


def test_profiles_read_the_table():
    table = small_table()
    depth = depth_profile(table, step=1)
    assert depth.blocks == [0, 1, 2] and depth.top.shape == (3, 3)
    assert torch.equal(depth.top[0, :2], table[(0, 1)].max_abs[[11, 42]])
    steps = step_profile(table, block=2, channels=[11, 42])
    assert steps.timesteps == [1000.0, 500.0] and steps.values.shape == (2, 2)
    with pytest.raises(InvalidArgumentError, match=r"channels \[64\] are out of range; valid .* 0..63"):
        step_profile(table, block=2, channels=[64])


# --- detection -------------------------------------------------------------------------------


def test_ratio_rule_finds_exactly_the_injected_channels():
    assert detect_ratio(activations_with_massive_channels()) == INJECTED


def test_ratio_rule_threshold_is_inclusive_and_rejects_just_below():
    x = activations_with_massive_channels()
    x[:, 5] = 1e3  # placeholder far above the median: the median over channels does not move
    x[:, 7] = 1e3
    reference = channel_stats(x).median_abs.median()
    x[:, 5] = 99.9 * reference  # just below 100x: rejected
    x[:, 7] = 100.0 * reference  # exactly 100x: accepted (>=)

    assert detect_ratio(x, threshold=100.0) == [7, 11, 42]
    assert detect_ratio(x, threshold=99.0) == [5, 7, 11, 42]


def test_ratio_rule_finds_the_injected_channels_in_the_reference_flux_block_inputs(flux_tiny_blocks):
    for block in (19, 28):
        assert detect_ratio(tokens_of(flux_tiny_blocks[f"k{block}_raw"])) == INJECTED


def test_sun_rule_needs_both_the_absolute_and_the_relative_test():
    x = torch.full((32, 8), 0.1) * torch.where(torch.rand(32, 8) > 0.5, 1.0, -1.0)
    x[3, 1] = 150.0  # > 100 and 1500x the median: massive
    x[5, 2] = 99.0  # 990x the median but not > 100: rejected
    x[7, 4] = -120.0  # sign does not matter
    assert detect_sun(x) == [1, 4]
    assert detect_sun(x, rel_threshold=1500.0) == [1]
    assert sun_massive_entries(x).tolist() == [[3, 1], [7, 4]]


def test_sun_rule_rejects_large_values_that_are_not_far_above_the_median():
    x = torch.randn(64, 16) * 10
    x[0, 3] = 500.0  # > 100 but only ~75x the median |x| (~6.7)
    assert detect_sun(x) == []


def test_top_k_rule_ranks_by_absolute_channel_mean():
    x = activations_with_massive_channels()
    x[:, 20] = torch.where(torch.arange(256) % 2 == 0, 300.0, -300.0)  # large |x| but zero mean
    assert detect_top_k(x, k=2) == INJECTED
    assert 20 in detect_top_k(x, k=2, statistic="mean_abs")


def test_rules_apply_per_block_and_step_of_a_table(flux_tiny_blocks):
    table = StatsTable()
    for block in (19, 28):
        table.add(block, 0, channel_stats(tokens_of(flux_tiny_blocks[f"k{block}_raw"])))
    assert detect_table(table, RatioRule()) == {(19, 0): INJECTED, (28, 0): INJECTED}
    assert detect_table(table, TopKRule(k=2)) == {(19, 0): INJECTED, (28, 0): INJECTED}
    # |x| reaches 400 but the median |x| is near 1: far below Sun et al.'s 1000x.
    assert detect_table(table, SunRule()) == {(19, 0): [], (28, 0): []}
    assert detect_table(table, SunRule(rel_threshold=100.0))[(28, 0)] == INJECTED


def test_unknown_statistic_lists_the_valid_ones():
    with pytest.raises(InvalidArgumentError, match="valid: mean_abs, abs_mean"):
        detect_top_k(torch.randn(4, 4), k=1, statistic="mean")


# --- channel sets ----------------------------------------------------------------------------


def test_top_bottom_and_random_sets():
    scores = torch.tensor([5.0, 1.0, 9.0, 3.0, 7.0, 0.5])
    assert top_k_channels(scores, 2) == [2, 4]
    assert top_k_channels(scores, 2, exclude=[2]) == [0, 4]
    assert bottom_k_channels(scores, 2) == [1, 5]
    first = random_k_channels(6, 3, seed=1, exclude=[2, 4])
    assert first == random_k_channels(6, 3, seed=1, exclude=[2, 4])
    assert len(first) == 3 and not {2, 4} & set(first)


def test_random_sets_differ_across_seeds():
    assert len({tuple(random_k_channels(100, 5, seed=seed)) for seed in range(5)}) == 5


def test_channel_set_arguments_out_of_range():
    with pytest.raises(InvalidArgumentError, match="k=7 top channels is impossible"):
        top_k_channels(torch.ones(6), 7)
    with pytest.raises(InvalidArgumentError, match=r"exclude \[6\] are out of range"):
        random_k_channels(6, 1, seed=0, exclude=[6])


def test_magnitude_matched_control_takes_the_closest_unused_channels():
    scores = torch.tensor([100.0, 1.0, 90.0, 2.0, 40.0, 45.0, 0.1, 8.0])
    control = magnitude_matched_channels(scores, reference=[0, 2])
    assert control == [4, 5]  # 45 and 40 are the largest non-reference magnitudes
    assert magnitude_matched_channels(scores, reference=[0, 2], exclude=[5]) == [4, 7]
    assert magnitude_matched_channels(scores, reference=[3]) == [1]  # 1.0 is nearest to 2.0 in log scale


def test_magnitude_matched_control_is_seeded_when_drawing_from_a_pool():
    scores = torch.arange(1.0, 101.0)
    draws = {tuple(magnitude_matched_channels(scores, [50], seed=seed, pool=5)) for seed in range(20)}
    assert all(abs(channel - 50) <= 3 for (channel,) in draws) and len(draws) > 1
    same_seed = [magnitude_matched_channels(scores, [50], seed=3, pool=5) for _ in range(2)]
    assert same_seed[0] == same_seed[1]


# --- stability -------------------------------------------------------------------------------


def test_jaccard_by_hand():
    assert jaccard([1, 2, 3], [2, 3, 4]) == 2 / 4
    assert jaccard([1], []) == 0.0
    matrix = jaccard_matrix([[1, 2], [1, 2], [3]])
    assert matrix.tolist() == [[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
    assert mean_pairwise_jaccard(matrix) == pytest.approx(1 / 3)
    assert mean_pairwise_jaccard(jaccard_matrix([[1]])) is None


def test_jaccard_of_two_empty_sets_is_missing_not_one():
    assert jaccard([], []) is None
    matrix = jaccard_matrix([[], [], [11]])
    assert matrix[0, 1].isnan() and matrix[0, 0].isnan() and matrix[2, 2] == 1.0 and matrix[0, 2] == 0.0
    assert mean_pairwise_jaccard(matrix) == 0.0  # only the defined pairs (empty vs {11}) count
    assert mean_pairwise_jaccard(jaccard_matrix([[], []])) is None


def test_a_report_of_empty_sets_writes_missing_stability_not_one(tmp_path):
    table = StatsTable()  # block 0 has massive channels at every step, block 1 none at any
    for step in range(3):
        table.add(0, step, channel_stats(activations_with_massive_channels(seed=step)))
        table.add(1, step, channel_stats(torch.randn(32, 64, generator=torch.Generator().manual_seed(step))))
    report = build_scan_report(table, [RatioRule()])
    stability = json.loads(write_scan_report(report, tmp_path)["json"].read_text())["stability"]["ratio(threshold=100.0)"]
    assert stability["across_steps"] == [
        {"block": 0, "mean_jaccard": 1.0, "min_jaccard": 1.0, "pairs": 3, "undefined_pairs": 0},
        {"block": 1, "mean_jaccard": None, "min_jaccard": None, "pairs": 3, "undefined_pairs": 3},
    ]
    assert stability["across_blocks"][0]["mean_jaccard"] == 0.0  # {11, 42} vs {} is defined: no overlap
    assert "| 1 | – | – |" in render_markdown(report)


def test_the_jaccard_figure_leaves_undefined_cells_blank():
    from ditf.massive.plots import jaccard_figure

    figure = jaccard_figure(jaccard_matrix([[], [], [11]]), [0, 1, 2])
    (axes, _colorbar) = figure.axes
    numbers = {(round(text.get_position()[1]), round(text.get_position()[0])): text.get_text() for text in axes.texts}
    assert numbers == {(0, 2): "0.00", (1, 2): "0.00", (2, 0): "0.00", (2, 1): "0.00", (2, 2): "1.00"}
    shown = axes.images[0].get_array()
    assert shown.mask[0, 0] and shown.mask[0, 1] and not shown.mask[2, 2]
    figure.canvas.draw()
    pixels = np.asarray(figure.canvas.buffer_rgba())
    x, y = axes.transData.transform((0, 0))
    assert tuple(pixels[round(pixels.shape[0] - y), round(x), :3]) == (255, 255, 255)  # blank, not a colour


def test_stability_across_steps_blocks_and_runs():
    detections = {(0, 0): [11, 42], (0, 1): [11], (1, 0): [11, 42], (1, 1): [11, 42]}
    steps = jaccard_across_steps(detections, block=0)
    assert steps.labels == [0, 1] and steps.matrix[0, 1] == 0.5
    assert jaccard_across_blocks(detections, step=1).matrix[0, 1] == 0.5
    runs = jaccard_across_runs({"corgi": detections, "tiger": {(0, 0): [42]}}, block=0, step=0)
    assert runs.labels == ["corgi", "tiger"] and runs.matrix[0, 1] == 0.5
    with pytest.raises(InvalidArgumentError, match=r"runs \['tiger'\] have no detections at block 1"):
        jaccard_across_runs({"corgi": detections, "tiger": {(0, 0): [42]}}, block=1, step=0)


# --- AdaLN alignment -------------------------------------------------------------------------


def test_alignment_measures_overlap_with_gate_and_scale_peaks():
    gate = torch.zeros(64)
    gate[[11, 42]] = torch.tensor([3.0, -4.0])  # the sign does not matter: peaks are by |value|
    scale = torch.zeros(64)
    scale[[11, 5]] = 2.0

    result = adaln_alignment(INJECTED, gate, scale)

    assert result.gate_peaks == [11, 42] and result.gate_jaccard == 1.0 and result.gate_recall == 1.0
    assert result.scale_peaks == [5, 11] and result.scale_jaccard == 1 / 3 and result.scale_recall == 0.5


def test_alignment_on_the_reference_flux_blocks_is_low_because_its_gates_are_random(flux_tiny_blocks):
    gate = flux_tiny_blocks["k28_gate"].numpy()
    largest = sorted(int(c) for c in np.argsort(-np.abs(gate), kind="stable")[: len(INJECTED)])
    result = adaln_alignment(INJECTED, flux_tiny_blocks["k28_gate"], flux_tiny_blocks["k28_scale"])
    assert result.gate_peaks == largest and not set(largest) & set(INJECTED)  # MAs enter through img_in, not the gate
    assert result.gate_recall == 0.0


def test_alignment_checks_shapes_and_emptiness():
    with pytest.raises(InvalidArgumentError, match=r"scale has shape \(32,\)"):
        adaln_alignment([1], torch.ones(64), torch.ones(32))
    with pytest.raises(InvalidArgumentError, match="ma_channels is empty"):
        adaln_alignment([], torch.ones(64))


# --- reports ---------------------------------------------------------------------------------


def test_scan_report_json_and_markdown(tmp_path):
    table = small_table()
    gate = torch.zeros(64)
    gate[[11, 42]] = 1.0
    runs = {"seed0": small_table(), "seed1": small_table()}
    report = build_scan_report(
        table,
        [RatioRule(), SunRule(), TopKRule(k=2)],
        adaln={(2, 1): (gate, None)},
        runs=runs,
        meta={"prompt": "a corgi"},
    )
    paths = write_scan_report(report, tmp_path)

    data = json.loads(paths["json"].read_text())
    assert data["meta"] == {"model": "synthetic", "prompt": "a corgi"}
    ratio_cells = data["detections"]["ratio(threshold=100.0)"]
    assert len(ratio_cells) == 6 and all(cell["channels"] == INJECTED for cell in ratio_cells)
    assert data["top_channels"][0]["channels"][0]["channel"] == 11
    assert data["stability"]["top_k(k=2, statistic=abs_mean)"]["across_steps"][0]["mean_jaccard"] == 1.0
    assert data["stability"]["ratio(threshold=100.0)"]["across_runs"][0]["mean_jaccard"] == 1.0
    (aligned,) = data["alignment"]["cells"]
    assert (aligned["block"], aligned["step"], aligned["ma_channels"]) == (2, 1, INJECTED)
    assert (aligned["gate_peaks"], aligned["gate_jaccard"], aligned["gate_recall"]) == (INJECTED, 1.0, 1.0)
    assert aligned["scale_peaks"] is None

    markdown = paths["markdown"].read_text()
    assert "| 2 | 11, 42 | 11, 42 |" in markdown  # block 2 at steps 0 and 1
    assert "step 1 (t=500)" in markdown
    assert "## AdaLN alignment" in markdown
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_markdown_summarises_long_step_lists_per_block():
    table = StatsTable()
    for step in range(12):
        x = activations_with_massive_channels(seed=step, tokens=32)
        if step % 2:
            x[:, 5] = 500.0
        table.add(0, step, channel_stats(x))
    markdown = render_markdown(build_scan_report(table, [RatioRule()]))
    assert "| 0 | 11, 42 | 5, 11, 42 |" in markdown


def test_report_refuses_alignment_for_cells_it_did_not_record():
    with pytest.raises(InvalidArgumentError, match="block 9, step 0"):
        build_scan_report(small_table(), [RatioRule()], adaln={(9, 0): (torch.ones(64), None)})


def test_scan_figures_from_reduced_statistics(tmp_path):
    table = small_table()
    written = write_scan_figures(table, detect_table(table, RatioRule()), tmp_path, blocks=[2], progress=False)
    names = sorted(path.name for path in written)
    assert "depth_profile_step1.png" in names and "step_profile_block2.pdf" in names
    assert "jaccard_steps_block2.png" in names and "jaccard_blocks_step1.png" in names
    assert all(path.stat().st_size > 1000 for path in written)


def test_saving_statistics_of_overflowed_activations_explains_the_nan(tmp_path):
    table = StatsTable({(0, 0): channel_stats(torch.tensor([[1.0, float("inf")], [2.0, 3.0]]))})
    with pytest.raises(InvalidArgumentError, match="NaN or infinity"):
        save_stats_table(table, tmp_path / "stats.json")
    assert not list(tmp_path.iterdir())
