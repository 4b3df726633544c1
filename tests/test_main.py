"""The command line end to end, and its answers to bad input."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from helpers import (ROOT, cli, devices_env, error_line, metrics_rows, one_and_two_processes,
                     reading_digits, tiny_config)
from monoformer_jax import train
from monoformer_jax.base.errors import UserError
from monoformer_jax.convert import synthetic
from monoformer_jax.data import digits
from monoformer_jax.generation import mixed_modal
from monoformer_jax.run import inference

TINY = ['--config=configs/digits.py', '--config.model.size=tiny', '--config.train.num_steps=2']


def _bad_inputs(tmp_path):
  """(command line, what its error must name) for every kind of bad input; {trained} is a
  trained workdir, and train commands use {new}, which must not be created."""
  (tmp_path / 'a_file').write_text('')
  hf_config = json.dumps(dict(model_type='llama', vocab_size=10, hidden_size=8,
                              intermediate_size=16, num_hidden_layers=1, num_attention_heads=2))
  for name in ('no_weights', 'truncated', 'no_shape'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(hf_config)
  (tmp_path / 'no_shape' / 'config.json').write_text('{"model_type": "llama"}')
  truncated = tmp_path / 'truncated'
  (truncated / 'model.safetensors').write_bytes(b'\x40\x00\x00\x00\x00\x00\x00\x00{"a":')
  (tmp_path / 'chat.jsonl').write_text('{"messages": [\n')
  train = ['train', *TINY, '--workdir={new}']
  return [
      # Found only once the workdir exists (the datasets need its tokenizer): it is removed.
      (train + ['--config.data.text_source=chat_jsonl',
                f'--config.data.chat_files={tmp_path / "chat.jsonl"}'], 'chat.jsonl, line 1'),
      (train + ['--config.train.num_stesp=3'],  # an unknown config key
       'config key train.num_stesp (--config.train.num_stesp) does not exist; did you mean '
       'train.num_steps?'),
      (['train', '--config=configs/digitz.py', '--workdir={new}'],
       '--config file configs/digitz.py does not exist'),
      (['sample', '--workdir={trained}', '--nums=3'], '--nums is not a flag of `sample`; did you '
                                                      'mean --num?'),
      (['evaluate', '--workdir={trained}', '--prompt=x'], '--prompt is not a flag of `evaluate`'),
      (['evaluate', '--workdir={trained}', f'--fid_ref={tmp_path / "ref.npz"}'],
       'evaluate --fid_ref measures the FID of --num samples of the model; give --num=N'),
      (['convert', f'--src={tmp_path}'], 'convert takes one kind out of llama,'),
      (['convert', 'export-peft', '--src={trained}', '--dst={new}'],
       "has none (it was trained with train.finetune 'full', not 'lora' or 'qlora')"),
      (['generate', '--workdir={trained}', f'--out={tmp_path / "a_file"}'],
       'is a file; generate --out expects a directory'),
      # Resuming with another model size: the saved shape is named, no fallback is tried.
      (['train', *TINY, '--workdir={trained}', '--config.model.size=digits'],
       "model.size is 'tiny' there and 'digits' here"),
      (train + ['--config.data.text_file=/no/such/corpus.txt'], '/no/such/corpus.txt'),
      (train + ['--config.train.num_steps=abc'], 'num_steps'),  # a value of the wrong type
      (train + ['--bogus=1'], 'bogus'),  # an unknown flag
      (train + ['--config.train.keep_checkpoints=0'], 'train.keep_checkpoints'),
      (['train', *TINY, f'--workdir={tmp_path / "a_file"}'], 'is a file'),
      (['train', *TINY, f'--workdir={tmp_path / "a_file" / "below"}'], 'is a file'),
      (['trian', '--workdir={new}'], 'trian'),  # an unknown command
      (['sample', '--workdir={trained}', '--num=abc'], 'num'),
      # Samplers: a name that does not exist, no steps, one for the other process, too many
      # steps for DPM-Solver++'s spacing, a process that does not exist.
      (['sample', '--workdir={trained}', '--sampler=dpmpp_3m'], 'dpmpp_3m'),
      (['sample', '--workdir={trained}', '--steps=0'], '--steps is 0; expected 1..1000'),
      (['sample', '--workdir={trained}', '--sampler=heun'], "the sampler 'heun' (--sampler"),
      (['sample', '--workdir={trained}', '--sampler=dpmpp_2m', '--steps=1000'],
       'repeat a timestep'),
      (train + ['--config.diffusion.process=flwo'], "config key diffusion.process is 'flwo'"),
      (train + ['--config.diffusion.process=flow', '--config.sample.sampler=ddim'],
       'config keys sample.sampler and sample.steps'),
      (['generate', '--workdir={trained}', '--prompt=The', '--max_tokens=100000'],
       'model.context_length'),
      # Images to understand: an encoder that does not exist, CLIP without its directory, a
      # source without an encoder, a conversion from a directory that is not there.
      (train + ['--config.model.vision_encoder=siglip'],
       "config key model.vision_encoder is 'siglip'; expected one of 'none', 'vae', 'clip'"),
      (train + ['--config.model.vision_encoder=clip', f'--config.model.clip={tmp_path / "nope"}'],
       'which is not a converted CLIP directory'),
      (train + ['--config.train.understanding_eval_every=5'],
       'train.understanding_eval_every asks the held-out digit questions'),
      (train + ['--config.data.understanding_source=digits',
                '--config.train.understanding_weight=1'], 'whose images need a vision encoder'),
      (['convert', 'clip', f'--src={tmp_path / "no_clip"}', '--dst={new}'],
       'error: CLIP directory'),
      (['convert', 'gguf', f'--src={tmp_path}', '--dst={new}'], 'gguf'),
      (['convert', 'llama', f'--src={tmp_path / "no_weights"}', '--dst={new}'], 'model.safetensors'),
      (['convert', 'llama', f'--src={truncated}', '--dst={new}'], 'model.safetensors'),
      (['convert', 'llama', f'--src={tmp_path / "no_shape"}', '--dst={new}'], 'vocab_size'),
  ]


@pytest.mark.slow
def test_every_bad_input_is_one_sentence(trained, tmp_path):
  """Each ends with one `error:` line naming the thing, exit 2, no traceback, nothing written."""
  for i, (args, named) in enumerate(_bad_inputs(tmp_path)):
    new = tmp_path / f'new{i}'
    result = cli(*[a.format(trained=trained, new=new) for a in args])
    errors = [l for l in result.stderr.splitlines() if l.startswith('error:')]
    assert result.returncode == 2 and len(errors) == 1, (args, result.stderr[-2000:])
    assert named in errors[0] and 'Traceback' not in result.stderr, (args, errors[0])
    assert not new.exists(), args


def test_each_command_lists_its_own_flags():
  result = cli('sample', '--help')
  assert result.returncode == 0 and result.stdout.startswith('python -m monoformer_jax sample ')
  flags = [line.split(':')[0].strip() for line in result.stdout.splitlines()
           if line.startswith('  --')]
  assert {'--num', '--prompt', '--steps', '--sampler', '--vae'} <= set(flags)
  assert '--max_tokens' not in flags and '--config' not in flags
  result = cli('convert', '--help')
  assert result.returncode == 0 and 'synthetic-llama' in result.stdout and '--src' in result.stdout
  assert result.stdout.count('convert KIND --src=DIR --dst=DIR') == 1
  # A flag's help is what it means for this command.
  result = cli('generate', '--help')
  helps = dict(line.strip().split(': ', 1) for line in result.stdout.splitlines()
               if line.startswith('  --'))
  assert helps['--out'].startswith('Directory to write generation.json') and 'PNG' not in helps['--out']
  assert helps['--num'].startswith('With --out: rows to generate')
  assert helps['--image'].endswith('(repeat the flag for more pictures).')
  result = cli('--help')
  assert result.returncode == 0 and all(f'  {c} ' in result.stdout
                                        for c in ('train', 'evaluate', 'prepare', 'study'))


def test_sample_without_checkpoint(tmp_path):
  out = tmp_path / 'x.png'
  result = cli('sample', f'--workdir={tmp_path}', '--prompt=a handwritten digit one', f'--out={out}')
  assert result.returncode != 0
  assert 'no checkpoint' in error_line(result)
  assert not out.exists()


@pytest.mark.slow
def test_prompt_longer_than_configured(trained, tmp_path):
  out = tmp_path / 'x.png'
  result = cli('sample', f'--workdir={trained}', '--prompt=' + 'seven ' * 40, f'--out={out}')
  assert result.returncode != 0
  assert 'data.prompt_len' in error_line(result)
  assert not out.exists() and not (tmp_path / 'x.npz').exists()


@pytest.mark.slow
def test_sample_generate_evaluate(trained, tmp_path):
  out = tmp_path / 'seven.png'
  result = cli('sample', f'--workdir={trained}', '--prompt=a handwritten digit seven', '--num=3',
               f'--out={out}', '--steps=4', '--sampler=ddim', '--ema=false')
  assert result.returncode == 0, result.stderr[-2000:]
  images = np.load(tmp_path / 'seven.npz')['images']
  assert images.dtype == np.uint8 and images.shape == (3, 8, 8, 1)
  assert out.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'

  result = cli('generate', f'--workdir={trained}', '--prompt=The', '--max_tokens=5', '--top_k=5')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('The')

  result = cli('evaluate', f'--workdir={trained}', '--tasks=next_line', '--limit=8')
  assert result.returncode == 0, result.stderr[-2000:]
  # The sampler flags are honoured, and eval.json says which sampler its figures come from.
  result = cli('evaluate', f'--workdir={trained}', '--sampler=ddim', '--steps=3', '--cfg_scale=1')
  assert result.returncode == 0, result.stderr[-2000:]
  table = result.stdout.splitlines()
  header = next(i for i, line in enumerate(table) if line.split()[:2] == ['overall', 'zero'])
  assert table[header + 1].split()[0] == 'accuracy' and len(table[header + 1].split()) == 12
  assert any(line.split()[0] == 'text/perplexity' for line in table[header:])
  for phase in ('eval: sampling 10 digits (ddim, 3 steps) ...', 'eval: held-out perplexity ...',
                'next_line: scoring 200 questions ...'):
    assert phase in result.stdout
  with open(os.path.join(trained, 'eval.json')) as f:
    saved = json.load(f)
  assert saved['tasks'][0]['items'] == 8  # evaluate --tasks' table, kept by the merge
  assert (saved['sampler'], saved['sampler_steps'], saved['cfg_scale']) == ('ddim', 3, 1.0)
  # train on a workdir trained and evaluated to its num_steps does not evaluate again (the
  # fixture's optimizer has no schedule, which the digits config adds).
  result = cli('train', *TINY, '--config.optim.cosine_decay=false', '--config.optim.warmup_steps=0',
               f'--workdir={trained}')
  assert result.returncode == 0, result.stderr[-2000:]
  assert 'is trained to step 2 and evaluated (eval.json); nothing to do' in result.stdout
  assert 'eval:' not in result.stdout


@pytest.mark.slow
def test_a_user_sees_no_line_but_ours(tmp_path):
  """Fresh interpreters, as a user starts them (the forked commands of cli() start from a server
  that has TensorFlow loaded already): a short train, sample, generate and convert hf write
  nothing to stderr, say what they wrote, and the train leaves no lock file behind."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}

  def run(*args):
    result = subprocess.run([sys.executable, '-m', 'monoformer_jax', *args], cwd=ROOT,
                            env=dict(env, PYTHONPATH=ROOT), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0 and result.stderr == '', (args, result.stderr[-3000:])
    return result.stdout

  workdir = tmp_path / 'w'
  said = run('train', *TINY, '--config.train.eval_at_end=false', f'--workdir={workdir}')
  assert f'done: step 2 saved in {workdir}/checkpoints; the metrics of every logged step in ' in said
  assert not (workdir / 'train.lock').exists()
  run('sample', f'--workdir={workdir}', '--prompt=a handwritten digit one', '--num=2',
      '--steps=2', f'--out={tmp_path / "one.png"}')
  said = run('generate', f'--workdir={workdir}', '--prompt=a handwritten digit', '--num=1',
             '--max_tokens=4', '--steps=2', f'--out={tmp_path / "mixed"}')
  assert said.splitlines()[-1].startswith(f'wrote {tmp_path / "mixed" / "generation.json"} and ')
  synthetic.write_synthetic(str(tmp_path / 'hf'), '64,2,4,2,128,512', False)
  run('convert', 'hf', f'--src={tmp_path / "hf"}', f'--dst={tmp_path / "converted"}')


@pytest.mark.slow
def test_a_flow_workdir_end_to_end(tmp_path):
  """Trained with diffusion.process=flow, sampled with its own samplers, refused with the other
  process's and by export-official."""
  workdir = tmp_path / 'flow'
  result = cli('train', *TINY, '--config.diffusion.process=flow', '--config.train.eval_at_end=false',
               f'--workdir={workdir}')
  assert result.returncode == 0, result.stderr[-2000:]
  out = tmp_path / 'heun.png'
  result = cli('sample', f'--workdir={workdir}', '--prompt=a handwritten digit one', '--num=2',
               f'--out={out}', '--steps=3', '--sampler=heun')
  assert result.returncode == 0, result.stderr[-2000:]
  assert np.load(tmp_path / 'heun.npz')['images'].shape == (2, 8, 8, 1)
  result = cli('sample', f'--workdir={workdir}', '--prompt=x', '--sampler=dpmpp_2m')
  errors = [line for line in result.stderr.splitlines() if line.startswith('error:')]
  assert result.returncode == 2 and len(errors) == 1
  assert "samples ddpm models, and this one is flow" in errors[0], errors
  back = tmp_path / 'official'
  result = cli('convert', 'export-official', f'--src={workdir}', f'--dst={back}')
  assert result.returncode == 2 and "diffusion.process is 'flow'" in result.stderr, result.stderr
  assert not back.exists()


def test_generate_reads_pictures(trained, workdir, tmp_path):
  """generate --image: the prompt reads the pictures (a digit PNG), or one error sentence."""
  config = reading_digits(tiny_config(num_steps=2))
  config.train.understanding_eval_every = 2  # the questions answered while training, as rows
  train.train_and_evaluate(config, workdir)
  row, = [r for r in metrics_rows(workdir) if r['kind'] == 'digit_questions']
  assert row['step'] == 2 and {'understanding/two_images', 'understanding/contradictions'} <= set(row)
  images, _ = digits.subset(0.25, heldout=True)
  picture = tmp_path / 'digit.png'
  Image.fromarray(np.round((images[0, ..., 0] + 1) * 127.5).astype(np.uint8)).save(picture)
  result = cli('generate', f'--workdir={workdir}', f'--image={picture}', '--max_tokens=3',
               '--prompt=Which digit is this?', '--temperature=0')
  assert result.returncode == 0, result.stderr[-2000:]
  assert result.stdout.startswith('<image>\nWhich digit is this?')
  result = cli('generate', f'--workdir={trained}', f'--image={picture}')
  assert result.returncode == 2 and 'needs a model that reads images' in error_line(result)
  (tmp_path / 'notes.png').write_text('not a picture')
  decoding = mixed_modal.Decoding(max_tokens=2, temperature=0.0, top_k=0, top_p=1.0)
  for pictures, prompt, named in (
      ([tmp_path / 'notes.png'], '', 'notes.png is not an image file that can be read'),
      ([picture], '<image> and <image>?', 'the prompt (--prompt) has 2 <image> placeholder(s) '
                                          'for 1 image(s)')):
    with pytest.raises(UserError, match=re.escape(named)):
      inference.generate(inference.Run(workdir), prompt, decoding, [str(p) for p in pictures])


def test_extract_latents_needs_a_vae_and_prepared_imagenet(tmp_path):
  dst = tmp_path / 'latents'
  result = cli('extract_latents', '--config=configs/digits.py', '--vae=/no/such/vae', f'--dst={dst}')
  assert result.returncode != 0 and '--vae' in error_line(result)
  (tmp_path / 'vae').mkdir()
  result = cli('extract_latents', '--config=configs/digits.py', f'--vae={tmp_path / "vae"}',
               f'--dst={dst}', '--config.data.image_source=imagenet',
               f'--config.data.tfds_data_dir={tmp_path / "tfds"}', '--config.train.eval_at_end=false',
               '--config.model.image_size=(256, 256)', '--config.model.image_channels=3',
               '--config.model.context_length=16400')
  assert result.returncode != 0 and 'data.imagenet_manual_dir' in error_line(result)
  assert not dst.exists()


@pytest.mark.slow
def test_fid_npz_is_the_same_on_one_and_four_devices(trained, tmp_path):
  outputs = []
  for devices in (1, 4):
    out = tmp_path / f'fid{devices}.npz'
    env = devices_env(devices)
    result = cli('sample', f'--workdir={trained}', f'--fid_npz={out}', '--num=13', '--fid_batch=8',
                 '--steps=3', env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    with np.load(out) as f:
      assert list(f.keys()) == ['arr_0']
      outputs.append(f['arr_0'])
    assert not list(tmp_path.glob('*.tmp'))
  one, four = outputs
  assert one.shape == (13, 8, 8, 3) and one.dtype == np.uint8
  assert (one[..., 0] == one[..., 2]).all()  # grayscale digits as RGB
  assert np.abs(one.astype(int) - four.astype(int)).max() <= 1
  assert len(np.unique(one.reshape(13, -1), axis=0)) == 13


@pytest.mark.slow
def test_fid_batch_must_split_over_devices(trained, tmp_path):
  result = cli('sample', f'--workdir={trained}', f'--fid_npz={tmp_path / "x.npz"}', '--num=4',
               '--fid_batch=0')
  assert result.returncode != 0 and '--fid_batch' in error_line(result)


@pytest.mark.multiprocess
def test_fid_npz_from_two_processes_matches_one(trained, tmp_path):
  """launch/local_multiprocess.sh: 2 processes x 2 devices write the file one process writes."""
  flags = ['sample', f'--workdir={trained}', '--num=10', '--fid_batch=8', '--steps=3']
  one, two = one_and_two_processes(flags, 'fid_npz', tmp_path, devices_per_process=2)
  with np.load(one) as a, np.load(two) as b:
    assert a['arr_0'].shape == b['arr_0'].shape == (10, 8, 8, 3)
    assert np.abs(a['arr_0'].astype(int) - b['arr_0'].astype(int)).max() <= 1
