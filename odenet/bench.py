"""Training-speed benchmark (being written): see issue 6."""

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    pass


def main(args: argparse.Namespace) -> int:
    raise SystemExit("odenet bench is not written yet")
