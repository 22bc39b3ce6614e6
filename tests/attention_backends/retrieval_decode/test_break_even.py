import json

from attention_backends.retrieval_decode import break_even


def test_crossover_interpolates_between_the_last_loss_and_the_first_lasting_win():
    # (context, sparse ms, dense ms): loses at 8K by 0.01, wins at 16K by 0.03 -> 8K + 8K * 1/4
    assert break_even.crossover([(16384, 0.05, 0.08), (8192, 0.05, 0.04), (32768, 0.06, 0.12)]) == 10240
    assert break_even.crossover([(4096, 0.01, 0.02), (8192, 0.01, 0.03)]) == 4096  # wins everywhere
    assert break_even.crossover([(4096, 0.05, 0.02), (8192, 0.05, 0.03)]) is None  # never wins
    # a win that does not last (noise at a short context) does not count
    assert break_even.crossover([(4096, 0.01, 0.02), (8192, 0.05, 0.04), (16384, 0.05, 0.07)]) == 8192 + 2731


def test_write_then_lookup(tmp_path):
    path = tmp_path / "t.json"
    break_even.write("GPU X", 4, 20000, {"points": [(16384, 0.05, 0.04), (32768, 0.05, 0.09)]}, path=path)
    break_even.write("GPU X", 1, None, {"points": [(16384, 0.05, 0.04), (32768, 0.1, 0.09)]}, path=path)
    data = json.loads(path.read_text())
    assert data["devices"]["GPU X"]["group_blocks=1"]["context_tokens"] == 32769  # never won: dense up to there
    assert break_even.min_context("GPU X", 4, 4096, path=path) == 20000
    assert break_even.min_context("GPU X", 4, 50000, path=path) == 50000
    assert break_even.min_context("GPU X", 2, 4096, path=path) == 4096
    assert break_even.min_context(None, 4, 4096, path=tmp_path / "missing.json") == 4096


def test_each_select_algorithm_has_its_own_entry(tmp_path):
    path = tmp_path / "t.json"
    break_even.write("GPU X", 1, 9000, {"points": [(8192, 0.05, 0.04)]}, select="radix", path=path)
    assert break_even.min_context("GPU X", 1, 4096, "radix", path=path) == 9000
    assert break_even.min_context("GPU X", 1, 4096, "bisect", path=path) == 4096
