from gpt.cli.app import main

main()
