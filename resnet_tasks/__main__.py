"""`python -m resnet_tasks` is the `resnet-tasks` command."""

from resnet_tasks.cli import main

if __name__ == "__main__":
    main()
