"""The command line: `main.py` assembles the app, one module per verb (`train_*` for `draftsmith train ...`),
`options.py` the flags they share."""
