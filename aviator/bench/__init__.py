"""The benchmarks behind ``aviator bench`` (:mod:`aviator.cli.bench`): each module has
``configure(parser)`` and ``run(args) -> int``. Needs the ``bench`` extra; production code
never imports this package."""
