from ftframe.cli import main

main()
