"""The benchmarks, apart from the model core: speed and memory against transformers (`python -m minidamro.bench`,
this package's __main__.py, with build.py's random checkpoints, llava7b.py's streamed 7B-shaped one and
workers.py's timed processes), LLaVA-NeXT at full shape (`python -m minidamro.bench.next`) and the evaluation
harness's per-image reuse (`python -m minidamro.bench.reuse`)."""
