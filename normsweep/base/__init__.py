"""The shared base every other part imports and that imports none of them: the errors a user can fix
(``errors``), passwords kept out of every record (``credentials``), the machine a run uses
(``runtime``), SIGTERM as Ctrl-C (``signals``), the files a run writes and ``RunRecord`` (``results``),
and the registry pattern every choice uses (``registry``)."""
