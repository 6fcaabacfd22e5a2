fn main() -> std::process::ExitCode {
    agent::cli_main()
}
