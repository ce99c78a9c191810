"""favor demo: placeholder, filled in below."""


def add_arguments(parser):
    parser.add_argument("--out", default="runs/demo")


def run(args):
    return 0
