from logitstore.cli import main

main()
