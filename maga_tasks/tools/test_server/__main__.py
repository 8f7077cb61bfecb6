"""``python -m maga_tasks.tools.test_server``: serve until SIGINT/SIGTERM (``--help``)."""

from maga_tasks.tools.test_server.serve import main

if __name__ == "__main__":
    main()
