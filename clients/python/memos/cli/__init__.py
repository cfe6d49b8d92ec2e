"""``memosctl``, the admin command line of memosd. The entry point is :func:`memos.cli.main.main`."""
