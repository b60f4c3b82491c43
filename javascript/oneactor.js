// Consistent Story: the Characters tab's create button. Makes the task id the host's progress bar follows
// (randomId / requestProgress come from the WebUI's own javascript/progressbar.js, in A1111 and Forge).
function consistentStoryCreateCharacter() {
    var args = Array.from(arguments);
    var id = randomId();
    var container = gradioApp().getElementById("consistent_story_oa_progress");
    requestProgress(id, container, null, function() {});
    args[0] = id;
    return args;
}
