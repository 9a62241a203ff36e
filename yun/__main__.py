from yun.cli.main import app

app(prog_name="yun")
