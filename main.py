"""gdiff command line from a checkout: `python main.py --config <experiment> --workdir <dir>
--mode <mode> [--config.group.key=value ...]`, the same as the installed `gdiff` command
(see gdiff/cli.py for the modes and how --config is resolved)."""

from gdiff import cli

if __name__ == "__main__":
    cli.main()
