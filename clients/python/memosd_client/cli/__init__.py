"""``memosctl``, the admin command line of memosd. The entry point is :func:`memosd_client.cli.main.main`."""
