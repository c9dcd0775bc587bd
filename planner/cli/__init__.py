"""`pilot`: a thin typer layer over library functions (the tests call those directly).

Each module here builds its commands (a group builds its own Typer app); this one assembles
them, so imports run one way: `planner.cli` -> `planner.cli.<command>` -> `_common` -> library.
"""

from __future__ import annotations

import typer

from planner.cli import bench, deploy, fit, generate, models, profile, quickstart, recommend, serve

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="pilot: profile, fit, recommend and serve LLM deployments.")
app.add_typer(models.app, name="models")
app.command()(generate.generate)
app.command()(profile.profile)
app.command("hardware")(profile.hardware_list)
app.add_typer(profile.runs_app, name="runs")
app.command()(fit.fit)
app.command()(recommend.recommend)
app.command()(recommend.schema)
app.command()(serve.serve)
app.command()(deploy.deploy)
app.add_typer(bench.app, name="bench")
app.command()(quickstart.quickstart)


def main() -> None:
    app()
