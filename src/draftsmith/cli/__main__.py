from draftsmith.cli.main import main

main()
