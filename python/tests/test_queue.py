"""Unit tests of pype_rs's pure parts (run by tests/it/biopype.rs with the bio-pype venv)."""
import os
import shlex
import unittest

from pype_rs import queue


class Jobs(unittest.TestCase):
    def test_step_names_are_what_the_coordinator_accepts_and_unique_by_run_id(self):
        self.assertEqual(queue.step_name("ABC123", "count chunk/00"), "count_chunk_00.ABC123")
        self.assertEqual(queue.step_name("R", "..."), "job.R")
        self.assertEqual(queue.step_name("R", None), "job.R")
        self.assertLessEqual(len(queue.step_name("R" * 10, "x" * 500)), 100)

    def test_times_are_slurm_style(self):
        self.assertEqual(queue.parse_time("00:05:00"), 300)
        self.assertEqual(queue.parse_time("1-02:00:00"), 93600)
        self.assertEqual(queue.parse_time("10:30"), 630)
        self.assertEqual(queue.parse_time(5), 300)
        self.assertIsNone(queue.parse_time(None))

    def test_job_words_find_the_log_dir_and_profile_or_nothing(self):
        cmd = "PYPE_MODULES=/m PYPE_SNIPPET_REQUIREMENTS='{\"ncpu\": 1}' /v/bin/pype --profile p snippets --log /l/q snip --in '/d/a b.txt'"
        words, log, profile = queue.job_words(cmd)
        self.assertEqual(log, "/l/q")
        self.assertEqual(profile, "p")
        self.assertIn("/d/a b.txt", words)
        self.assertEqual(queue.job_words("rm -rf /"), ([], None, None))
        self.assertEqual(queue.job_words("unbalanced 'quote"), ([], None, None))

    def test_the_worker_command_maps_pype_and_keeps_arguments_intact(self):
        cmd = "PYPE_MODULES=/m X='a b' /v/bin/pype --profile p snippets --log /l/q snip --in '/d/a b.txt'"
        text, shipped = queue.worker_command(cmd, "")
        self.assertEqual(shipped, [])
        last = text.splitlines()[-1]
        self.assertIn('PYPE_MODULES="$pype_rs_modules"', last)
        self.assertIn(shlex.join(["--in", "/d/a b.txt"]), last)
        self.assertIn("X='a b'", last)
        self.assertIn("pype_rs_exe=(/v/bin/pype)", text)
        text, shipped = queue.worker_command(cmd, "modules")
        self.assertEqual(shipped, ["/m"])
        text, shipped = queue.worker_command(cmd, "all")
        self.assertIn("exec python3 -m pype.commands", text)
        self.assertIn("/m", shipped)

    def test_a_command_that_is_not_a_biopype_job_is_refused_by_name(self):
        jobs = {"R1": {"name": "x", "command": "echo hi", "requirements": {}}}
        with self.assertRaisesRegex(ValueError, "not a bio-pype job"):
            queue.build_pipeline("p", jobs, ["R1"], "/l")

    def test_roots_are_directories_named_by_arguments_never_slash(self):
        jobs = {
            "R1": {"command": "/v/bin/pype --profile nope snippets --log /l/run/q1 s --out /o/dir --in /"},
            "R2": {"command": "/v/bin/pype --profile nope snippets --log /l/run/q2 s --in /d/x.txt --out /o/dir/sub"},
        }
        roots, write, imports = queue.world(jobs, "/l/run")
        self.assertEqual(roots, ["/d", "/l/run", "/o/dir"])
        self.assertEqual(write, ["/d", "/l/run", "/o/dir"], "/d/x.txt does not exist: an output to be")
        self.assertEqual(imports, [])

    def test_the_directory_of_an_existing_input_is_read_only(self):
        import tempfile

        with tempfile.TemporaryDirectory() as d:
            inp = os.path.join(d, "in.txt")
            open(inp, "w").close()
            jobs = {"R1": {"command": f"/v/bin/pype --profile nope snippets --log /l/run/q1 s --in {inp} --out /o"}}
            roots, write, imports = queue.world(jobs, "/l/run")
            self.assertIn(d, roots)
            self.assertNotIn(d, write)
            self.assertEqual(imports, [inp])


if __name__ == "__main__":
    unittest.main()
