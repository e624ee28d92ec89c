"""The training harness around the core: configs, the loop, data, models, checkpoints, the
divergence guard, distributed runs, records, plots, comparisons, the command line and the papers'
reproductions.

Built only on the core (``asymprop``'s public names); the core never imports it.
"""
