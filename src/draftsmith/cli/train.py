"""The `train` group: one verb per drafter that needs training (`student`, `heads`, `router`, `predictor`,
`bigram`); each verb's module adds itself to `train_app`."""

import typer

train_app = typer.Typer(no_args_is_help=True, help="Train the drafters that need training: the student, feature "
                                                    "heads, routers, the acceptance predictor, the bigram table.")
