"""The benchmark harness runs end to end (tiny settings) and reports what it promises."""
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / 'benchmarks' / 'bench_models.py'
_spec = importlib.util.spec_from_file_location('bench_models', _PATH)
bench_models = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_models)


def test_parse_spec():
    assert bench_models.parse_spec('inresnet_20') == ('inresnet_20', {})
    assert bench_models.parse_spec('m:a=false,b=0.5,c=[1,2],d=1e-4') == (
        'm', {'a': False, 'b': 0.5, 'c': [1, 2], 'd': 1e-4})
    with pytest.raises(ValueError, match="expected KEY=VALUE, got 'a'"):
        bench_models.parse_spec('m:a')


def test_bench_runs_side_by_side_with_ratios(tmp_path, capsys):
    out = tmp_path / 'bench.json'
    rc = bench_models.main([
        'cifar_resnet_20:layers=[1,1,1]', 'inresnet_20:layers=[2,2,2]', '--baseline', 'cifar_resnet_20:layers=[1,1,1]',
        '--batch-size', '4', '--steps', '1', '--warmup', '1', '--rounds', '1', '--device', 'cpu', '--json', str(out),
    ])
    assert rc == 0
    result = json.loads(out.read_text())
    rows = {r['config']: r for r in result['rows']}
    base, other = rows['cifar_resnet_20:layers=[1,1,1]'], rows['inresnet_20:layers=[2,2,2]']
    assert base['step_time_ratio'] == 1.0 and base['eval_time_ratio'] == 1.0 and base['step_cpu_time_ratio'] == 1.0
    assert other['params'] > base['params'] and other['kwargs'] == {'layers': [2, 2, 2]}
    for key in ('train_img_s', 'eval_img_s', 'train_step_ms', 'train_step_cpu_ms', 'train_step_gflop'):
        assert other[key] > 0
    assert base['step_flop_ratio'] == 1.0 and other['step_flop_ratio'] > 1.0  # twice the blocks, more convolutions
    # tensor-level peak of a step (the allocator's records): twice the blocks keep more activations
    assert other['peak_train_mem_mb'] > base['peak_train_mem_mb'] > 0
    assert other['spread']['train_step_ms'][0] <= other['train_step_ms'] <= other['spread']['train_step_ms'][1]
    table = capsys.readouterr().out
    assert '| inresnet_20:layers=[2,2,2] |' in table and 'step time / cifar_resnet_20:layers=[1,1,1]' in table


def test_time_and_memory_ratios_are_paired_round_by_round():
    """The ratio is the median of the per-round ratios (a row against the baseline of the same round), not the
    ratio of the medians, which pairs figures from different rounds."""
    def row(config, cpu_ms, mem_mb):
        return dict(config=config, train_step_ms=statistics.median(cpu_ms), train_step_cpu_ms=statistics.median(cpu_ms),
                    peak_train_mem_mb=statistics.median(mem_mb), train_step_gflop=2.0, eval_img_s=10.0, spread={},
                    per_round=dict(train_step_ms=cpu_ms, train_step_cpu_ms=cpu_ms, peak_train_mem_mb=mem_mb))
    base = row('plain', [1303, 1133, 1273, 1142, 1144], [137.0] * 5)
    other = row('memory-efficient', [2001, 1468, 1962, 1670, 1986], [23.0] * 5)
    bench_models.add_ratios([base, other], 'plain')
    per_round = [2001 / 1303, 1468 / 1133, 1962 / 1273, 1670 / 1142, 1986 / 1144]
    assert other['step_cpu_time_ratio'] == pytest.approx(statistics.median(per_round))  # 1.54
    assert other['step_cpu_time_ratio'] < 0.95 * (1962 / 1144)  # the ratio of the medians would read 1.72
    assert other['spread']['step_cpu_time_ratio'] == pytest.approx([min(per_round), max(per_round)])
    assert other['memory_ratio'] == pytest.approx(23 / 137) and base['step_cpu_time_ratio'] == 1.0


def test_bench_reports_a_failing_configuration(tmp_path):
    rc = bench_models.main(['no_such_model', '--baseline', 'no_such_model', '--rounds', '1', '--steps', '1',
                            '--device', 'cpu', '--json', str(tmp_path / 'b.json')])
    rows = json.loads((tmp_path / 'b.json').read_text())['rows']
    assert rc == 1 and 'Unknown model' in rows[0]['error']


def test_bench_reports_solver_statistics_of_implicit_models(tmp_path, capsys):
    spec = 'implicit_trapezoid_resnet:steps=[1,1,1],widths=[4,4,4]'
    rc = bench_models.main([spec, '--baseline', spec, '--batch-size', '2', '--steps', '1', '--warmup', '0',
                            '--rounds', '1', '--device', 'cpu', '--json', str(tmp_path / 'b.json')])
    assert rc == 0
    solver = json.loads((tmp_path / 'b.json').read_text())['rows'][0]['solver']
    assert solver['forward_solves'] == 3 and solver['backward_solves'] == 3 and solver['converged'] == 1.0
    assert 1 <= solver['forward_iterations_mean'] <= 30 and 0 <= solver['forward_residual_max'] <= 1e-4
    header = next(line for line in capsys.readouterr().out.splitlines() if line.startswith('| config |'))
    assert ' forward_iterations_mean ' in header.split('|') and ' backward_iterations_mean ' in header.split('|')


def test_grad_checkpointing_is_a_spec_key_not_a_model_kwarg(tmp_path):
    """A checkpointed ResNet computes more (one more forward of every block) than the same network without."""
    plain, checkpointed = 'cifar_resnet_20:layers=[1,1,1]', 'cifar_resnet_20:layers=[1,1,1],grad_checkpointing=true'
    rc = bench_models.main([plain, checkpointed, '--baseline', plain, '--batch-size', '2', '--steps', '1',
                            '--warmup', '0', '--rounds', '1', '--device', 'cpu', '--json', str(tmp_path / 'b.json')])
    assert rc == 0
    rows = {r['config']: r for r in json.loads((tmp_path / 'b.json').read_text())['rows']}
    assert rows[checkpointed]['params'] == rows[plain]['params']
    assert rows[checkpointed]['kwargs'] == {'layers': [1, 1, 1], 'grad_checkpointing': True}
    assert 1.2 < rows[checkpointed]['step_flop_ratio'] < 1.4
